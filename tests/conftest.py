import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from store_helpers import make_store, write_shard  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def store_factory(tmp_path):
    counter = iter(range(1000))

    def factory(**kwargs):
        return make_store(str(tmp_path / f"store{next(counter)}"), **kwargs)

    return factory


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server on 127.0.0.1 with a bucket `acts`; yields its endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "NO_PROXY": "127.0.0.1,localhost"}.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="acts")
    try:
        yield endpoint
    finally:
        server.stop()


__all__ = ["free_port", "make_store", "write_shard"]



def _child_pids() -> set[int]:
    me = str(os.getpid())
    out = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me and fields[0] != "Z":
                out.add(int(name))
    # multiprocessing's resource tracker is one per interpreter, started by the first shared memory
    # (the harvest's decode ring): it ends when the interpreter closes its pipe, so it never holds the exit
    from multiprocessing import resource_tracker

    out.discard(getattr(resource_tracker._resource_tracker, "_pid", None))
    return out


@pytest.fixture(autouse=True)
def _nothing_left_running(request):
    """Whatever a test starts, it stops: a non-daemon thread or a child process left behind holds the
    interpreter's exit, so the whole run prints its results and then never ends (a CI timeout, not a
    failure). Such a leak fails the test that made it, naming what was left."""
    import threading
    import time

    threads_before = set(threading.enumerate())
    children_before = _child_pids()
    yield
    deadline = time.monotonic() + 10.0
    left = [t for t in threading.enumerate() if t not in threads_before and not t.daemon]
    for thread in left:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    threads = [t.name for t in left if t.is_alive()]
    children = _child_pids() - children_before
    while children and time.monotonic() < deadline:
        time.sleep(0.05)
        children = _child_pids() - children_before
    for pid in children:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    if threads or children:
        pytest.fail(f"left running after the test: threads {threads}, child processes {sorted(children)}", pytrace=False)


_EXIT_PATIENCE_S = 120.0
_status = {"exit": 0}


def pytest_sessionfinish(session, exitstatus):
    _status["exit"] = int(exitstatus)


def pytest_unconfigure(config):
    """If the interpreter's exit is still held two minutes after the results are printed, print every
    thread's stack (which is what to fix) and end with the run's own status, instead of hanging until
    CI's limit without a word. The per-test check above is what should catch such a leak first."""
    import faulthandler
    import threading

    def force_exit():
        sys.stderr.write(f"\nthe test process did not exit {_EXIT_PATIENCE_S:.0f} s after its results; "
                         "what holds it:\n")
        sys.stderr.flush()
        faulthandler.dump_traceback(all_threads=True)
        os._exit(_status["exit"])

    timer = threading.Timer(_EXIT_PATIENCE_S, force_exit)
    timer.daemon = True
    timer.start()
