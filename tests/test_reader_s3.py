"""Readers on an object store (moto on 127.0.0.1) behind a fault-injecting HTTP proxy: GETs that
fail with 503 are retried with back-off and give the very same batches; a chunk that keeps failing
raises ChunkReadError naming it after exactly `io_attempts` GETs; a GET slower than `io_timeout`
is abandoned and retried; prefetching keeps at most `io_concurrency` GETs in flight."""

import collections
import http.client
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from activation_store import OrderedReader, ShuffledReader, open_store
from activation_store.errors import ChunkMissingError, ChunkReadError, DataError
from store_helpers import make_store, write_shard

PREFIX = "readers"
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FaultProxy:
    """Forwards every request to the S3 server, except GETs of object keys ending in a chosen
    suffix: `fail_first[suffix] = n` answers the first n with 503, `fail_always` every one,
    `delay_first[suffix] = s` holds the first one for s seconds. Counts GETs per object key (its
    path inside the store) and the most GETs of chunk objects in flight at once."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.split("//", 1)[1]
        self.fail_first: dict[str, int] = {}
        self.fail_always: set[str] = set()
        self.delay_first: dict[str, float] = {}
        self.gets = collections.Counter()
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _match(self) -> str | None:
                path = self.path.split("?", 1)[0]
                return next((k for k in (*proxy.fail_first, *proxy.fail_always, *proxy.delay_first)
                             if path.endswith(k)), None)

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                is_chunk = self.command == "GET" and "/c/" in self.path
                key = self._match() if self.command == "GET" else None
                with proxy.lock:
                    if self.command == "GET":
                        proxy.gets[self.path.split("?", 1)[0].split(".zarr/", 1)[-1]] += 1
                    if is_chunk:
                        proxy.in_flight += 1
                        proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                    fail = key is not None and (key in proxy.fail_always or proxy.fail_first.get(key, 0) > 0)
                    if fail and key in proxy.fail_first:
                        proxy.fail_first[key] -= 1
                    delay = proxy.delay_first.pop(key, 0) if key is not None else 0
                try:
                    if delay:
                        time.sleep(delay)
                    if fail:
                        msg = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ServiceUnavailable</Code>"
                               b"<Message>injected by the test proxy</Message></Error>")
                        self.send_response(503)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(msg)))
                        self.end_headers()
                        self.wfile.write(msg)
                        return
                    conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    conn.close()
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP and k.lower() != "content-length":
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on a delayed answer
                finally:
                    if is_chunk:
                        with proxy.lock:
                            proxy.in_flight -= 1

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", _free_port()), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def proxy(s3):
    p = FaultProxy(s3)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def url():
    """A fresh prefix per test: the moto servers of one process share their buckets."""
    return f"s3://acts/{PREFIX}/{uuid.uuid4().hex[:8]}.zarr"


def _write(endpoint: str, url: str, codec: str = "none"):
    store = make_store(url, storage_options={"endpoint_url": endpoint}, codec=codec)
    store.plan_shards([("a", 10), ("b", 7)])
    write_shard(store, "a", 0, 10)
    write_shard(store, "b", 1, 7)
    return store


def _drain(reader):
    xs, ids = [], []
    for x, i in reader:
        xs.append(x)
        ids.append(i)
    reader.close()
    return torch.cat(xs), torch.cat(ids)


KW = dict(batch_size=16, buffer_tokens=2 * 4 * 17, seed=4, return_ids=True, io_concurrency=2, prefetch=3)


@pytest.mark.parametrize("codec", ["none", "shuffle-zstd"])
def test_transient_failures_are_retried_and_give_the_same_batches(s3, proxy, url, codec):
    _write(s3, url, codec)
    want = _drain(ShuffledReader(open_store(url, {"endpoint_url": s3}), "resid_2", **KW))
    flaky = ["resid_2/c/0/0/0", "resid_2/c/2/0/0", "resid_2/c/4/0/0"]
    for k in flaky:
        proxy.fail_first[k] = 2
    store = open_store(url, {"endpoint_url": proxy.endpoint})
    got = _drain(ShuffledReader(store, "resid_2", io_attempts=4, **KW))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert all(proxy.gets[k] == 3 for k in flaky), proxy.gets  # two 503s, then the object
    assert 1 <= proxy.max_in_flight <= KW["io_concurrency"]


def test_a_chunk_that_keeps_failing_raises_chunk_read_error_naming_it(s3, proxy, url):
    _write(s3, url)
    proxy.fail_always.add("resid_5/c/4/0/0")
    store = open_store(url, {"endpoint_url": proxy.endpoint})
    reader = OrderedReader(store, "resid_5", batch_size=16, io_attempts=3, io_concurrency=2, prefetch=2)
    with pytest.raises(ChunkReadError, match=r"resid_5/c/4/0/0: 3 reads failed") as err:
        for _ in reader:
            pass
    reader.close()
    assert isinstance(err.value, DataError)
    assert proxy.gets["resid_5/c/4/0/0"] == 3  # exactly io_attempts GETs, then the error


def test_a_slow_get_is_abandoned_and_retried(s3, proxy, url):
    _write(s3, url)
    want = _drain(OrderedReader(open_store(url, {"endpoint_url": s3}), "resid_2", batch_size=16))
    # the first GET of chunk 1 is held 6 s, four times the timeout: only a second GET can have
    # delivered it (a loaded machine may need a third, for that or any chunk: not a failure)
    proxy.delay_first["resid_2/c/1/0/0"] = 6.0
    store = open_store(url, {"endpoint_url": proxy.endpoint})
    got = _drain(OrderedReader(store, "resid_2", batch_size=16, io_timeout=1.5, io_attempts=4))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert proxy.gets["resid_2/c/1/0/0"] >= 2


def test_a_missing_chunk_object_is_not_retried(s3, proxy, url):
    import boto3

    _write(s3, url)
    boto3.client("s3", endpoint_url=s3).delete_object(Bucket="acts", Key=url.split("acts/", 1)[1] + "/resid_2/c/2/0/0")
    store = open_store(url, {"endpoint_url": proxy.endpoint})
    reader = OrderedReader(store, "resid_2", batch_size=16, io_attempts=4)
    with pytest.raises(ChunkMissingError, match="resid_2/c/2/0/0"):
        for _ in reader:
            pass
    reader.close()
    assert proxy.gets["resid_2/c/2/0/0"] == 1


def test_prefetcher_keeps_its_depth_and_hands_out_each_object_once(s3, url):
    store = _write(s3, url)
    storage = open_store(url, {"endpoint_url": s3}).storage
    keys = [f"resid_2/c/{i}/0/0" for i in range(5)]
    direct = {k: storage.get(k) for k in keys}
    with storage.prefetcher(keys, depth=2, concurrency=2) as pf:
        assert pf.pending == 2
        for k in keys:
            assert storage.read_bytes(k) == direct[k]
            assert pf.pending <= 2
        assert pf.pending == 0
    assert not storage._prefetchers
    assert store.n_images == 17


def test_gets_go_through_obstore_and_give_what_fsspec_gives(s3, url, monkeypatch):
    """S3 GETs use obstore (bodies received without the GIL); the fsspec client, kept for options
    only s3fs understands, gives the very same batches."""
    from activation_store.store.object_reads import getter_for

    _write(s3, url)
    store = open_store(url, {"endpoint_url": s3})
    getter = store.storage.object_getter()
    assert getter is not None
    paths = []
    real_get = getter.get
    monkeypatch.setattr(getter, "get", lambda path, timeout=None: paths.append(path) or real_get(path, timeout))
    fast = _drain(ShuffledReader(store, "resid_2", **KW))
    assert sum("/resid_2/c/" in p for p in paths) == len(store.chunk_refs("resid_2"))  # every chunk, by obstore
    monkeypatch.setenv("ACTSTORE_S3_CLIENT", "fsspec")
    slow_store = open_store(url, {"endpoint_url": s3})
    assert slow_store.storage.object_getter() is None
    slow = _drain(ShuffledReader(slow_store, "resid_2", **KW))
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    monkeypatch.delenv("ACTSTORE_S3_CLIENT")
    assert getter_for("s3", {"endpoint_url": s3, "requester_pays": True}) is None  # an s3fs-only option
    assert getter_for("gs", {}) is None
    assert store.storage.read_bytes("zarr.json", count=False) == slow_store.storage.read_bytes("zarr.json", count=False)
    assert isinstance(store.storage.read_bytes("zarr.json", count=False), bytes)


@pytest.mark.parametrize("tokens", ["all", "cls"])
def test_an_fp8_store_on_s3_reads_as_on_disk_with_its_scales_prefetched(s3, url, tmp_path, monkeypatch, tokens):
    """fp8 on an object store: the batches equal those of the same store on a local disk, and each
    chunk's scale object is fetched once, by the prefetcher, beside its codes."""
    def build(where, **kw):
        st = make_store(where, dtype="fp8", **kw)
        st.plan_shards([("a", 10), ("b", 7)])
        write_shard(st, "a", 0, 10)
        write_shard(st, "b", 1, 7)
        return st

    build(url, storage_options={"endpoint_url": s3})
    local = build(str(tmp_path / "local"))
    want = _drain(ShuffledReader(open_store(local.url), "resid_2", tokens=tokens, dtype="float32", **KW))
    store = open_store(url, {"endpoint_url": s3})
    getter = store.storage.object_getter()
    paths = []
    real_get = getter.get
    monkeypatch.setattr(getter, "get", lambda path, timeout=None: paths.append((path, threading.current_thread().name))
                        or real_get(path, timeout))
    got = _drain(ShuffledReader(store, "resid_2", tokens=tokens, dtype="float32", **KW))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    scales = [(p, who) for p, who in paths if "/scales/" in p and "/c/" in p]
    assert len(scales) == len({p for p, _ in scales}) == len(store.chunk_refs("resid_2", cls=tokens == "cls"))  # once each
    assert all(who.startswith("actstore-get") for _, who in scales), scales  # by the prefetcher's threads
