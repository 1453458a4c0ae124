"""Many writers, one store; a writer killed mid-write leaves nothing visible and can be redone."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from activation_store.errors import CapacityError, ShardClaimedError, ShardStateError
from activation_store.store import layout, open_store
from activation_store.store.layout import shard_images_key
from store_helpers import records, shard_data, write_shard

HERE = os.path.dirname(__file__)


def _spawn(url, source, seed, n, *extra):
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, os.path.join(HERE, "shard_writer_process.py"), url, source, str(seed), str(n), *extra],
                            stdout=subprocess.PIPE, text=True, env=env)


def test_four_concurrent_writer_processes(store_factory):
    store = store_factory(codec="shuffle-zstd")
    sizes = {"s0": 9, "s1": 13, "s2": 4, "s3": 11}
    store.plan_shards(list(sizes.items()))
    procs = [_spawn(store.url, src, seed, n) for seed, (src, n) in enumerate(sizes.items())]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0 and "COMMITTED" in out
    s = open_store(store.url)
    assert s.n_images == sum(sizes.values())
    ranges = s.row_ranges()
    assert all(b0 >= a1 for (_, a1), (b0, _) in zip(ranges, ranges[1:]))  # no overlap
    keys = s.images()["key"].to_pylist()
    assert len(keys) == len(set(keys)) == sum(sizes.values())  # every image once
    rows = sorted(s.images()["row"].to_pylist())
    assert rows == sorted(r for a, b in ranges for r in range(a, b))
    for loc in s.locations:
        parts = {src: shard_data(s, seed, n)[loc].astype(np.float16) for seed, (src, n) in enumerate(sizes.items())}
        for shard in s.committed_shards():
            np.testing.assert_array_equal(s.read_rows(loc, shard.row_start, shard.row_stop, raw=True), parts[shard.source])
        x = np.concatenate(list(parts.values())).astype(np.float64).reshape(-1, s.d_model)
        m = s.stats(loc)
        assert m.count == len(x)
        np.testing.assert_allclose(m.mean, x.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(m.var, x.var(0), rtol=1e-10)


def _store_bytes(store):
    """Every object of the store that holds data (chunks, statistics, image table), by key."""
    files = store.storage.list_files("")
    return {k: store.storage.read_bytes(k) for k in files if "/c/" in k or k.endswith("images.parquet")}


def _reference_and_store(store_factory):
    """An uninterrupted store of shards a and b, and a store with only a written."""
    reference = store_factory(codec="zstd")
    reference.plan_shards([("a", 6), ("b", 15)])
    write_shard(reference, "a", 0, 6, batch=2, dropped=1)
    write_shard(reference, "b", 1, 15, batch=2, dropped=1)
    store = store_factory(codec="zstd")
    store.plan_shards([("a", 6), ("b", 15)])
    write_shard(store, "a", 0, 6, batch=2, dropped=1)
    return reference, store


def _assert_same_data(s, reference):
    got, want = _store_bytes(s), _store_bytes(reference)
    assert sorted(got) == sorted(want)
    for k in want:
        if k.endswith(".parquet"):
            continue  # parquet embeds no timestamps but compare its table, not its writer's bytes
        assert got[k] == want[k], k
    assert s.images(include_dropped=True).equals(open_store(reference.url).images(include_dropped=True))


def test_killed_writer_is_invisible_and_rewrite_gives_the_same_bytes(store_factory):
    reference, store = _reference_and_store(store_factory)
    p = _spawn(store.url, "b", 1, 15, "--hang-after", "5")  # 10 images written: two chunks on disk
    assert p.stdout.readline().strip() == "WROTE"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    s = open_store(store.url)
    assert s.n_images == 6 and s.shard("b").state == "writing"
    assert s.storage.read_bytes(shard_images_key(1)) is None
    assert any(k.startswith("resid_2/c/") for k in _store_bytes(s))  # the dead writer did leave chunks
    # rerun the same shard, then commit
    p = _spawn(store.url, "b", 1, 15)
    out, _ = p.communicate(timeout=120)
    assert "COMMITTED" in out
    s = open_store(store.url)
    assert s.n_images == 21
    _assert_same_data(s, reference)


def test_a_rerun_after_a_crash_removes_stale_chunks_beyond_the_new_data(store_factory):
    store = store_factory()
    store.plan_shards([("a", 16)])
    write_shard(store, "a", 0, 16, commit=False)  # a first attempt got 16 images in, then died
    write_shard(store, "a", 0, 5)  # the rerun stored only 5 (say the source changed)
    s = open_store(store.url)
    chunk_keys = [k for k in s.storage.list_files("resid_2/c")]
    assert len(chunk_keys) == 2  # rows 0-3 and 4: nothing left from the first attempt
    assert s.n_images == 5


# ---------------------------------------------------------------------------- claims: one writer per shard
def _claim_path(store, index=1):
    return os.path.join(store.url, "shards", f"s{index:06d}", "writer.claim")


def test_a_second_writer_of_a_shard_is_refused_and_a_dead_holders_claim_is_taken_over(store_factory):
    reference, store = _reference_and_store(store_factory)
    first = _spawn(store.url, "b", 1, 15, "--hang-after", "5")  # holds b's claim, 10 images written
    assert first.stdout.readline().strip() == "WROTE"
    before = _store_bytes(store)
    second = _spawn(store.url, "b", 1, 15)
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 2, out
    assert out.startswith("ERROR ShardClaimedError: input shard 'b' (s000001)") and out.count("\n") == 1
    assert f"pid {first.pid} on host {socket.gethostname()}" in out and "holds it since" in out
    assert first.poll() is None and _store_bytes(store) == before  # the refused writer touched nothing
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert os.path.exists(_claim_path(store))  # the dead writer's claim is left behind ...
    third = _spawn(store.url, "b", 1, 15)  # ... and taken over: its pid is gone on this host
    out, _ = third.communicate(timeout=120)
    assert "COMMITTED" in out, out
    s = open_store(store.url)
    assert not os.path.exists(_claim_path(s))
    _assert_same_data(s, reference)
    files = s.storage.list_files("")
    for loc in s.locations:  # the committed shard has all its chunks
        for cls in (False, True):
            refs = s.chunk_refs(loc, cls=cls, shards=[1])
            assert refs and all(layout.chunk_key(r.array_key, r.index, 2 if cls else 3) in files for r in refs)


def _fake_claim(store, index, host, refreshed_unix, timeout_s=3600.0):
    doc = {"shard": f"s{index:06d}", "source": "x", "token": "f" * 32, "pid": 1, "host": host, "machine": "elsewhere",
           "pid_start": None, "claimed_at": "2026-01-01T00:00:00+00:00", "refreshed_at": "2026-01-01T00:00:00+00:00",
           "refreshed_unix": refreshed_unix, "timeout_s": timeout_s}
    path = _claim_path(store, index)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f)


def test_a_claim_from_another_host_holds_until_its_lease_expires(store_factory):
    store = store_factory()
    store.plan_shards([("a", 5)])
    _fake_claim(store, 0, "gpu-node-7", time.time())  # refreshed just now
    with pytest.raises(ShardClaimedError, match=r"input shard 'a' \(s000000\).*pid 1 on host gpu-node-7 holds it since"):
        store.writer("a")
    assert json.load(open(_claim_path(store, 0)))["host"] == "gpu-node-7"  # untouched
    _fake_claim(store, 0, "gpu-node-7", time.time() - 7200)  # not refreshed for two hours: its lease (1 h) ran out
    write_shard(store, "a", 0, 5)
    assert open_store(store.url).n_images == 5 and not os.path.exists(_claim_path(store, 0))


def test_the_claim_is_held_while_writing_and_released_on_commit_and_on_close_after_an_error(store_factory):
    store = store_factory()
    store.plan_shards([("a", 4), ("b", 4)])
    data = shard_data(store, 0, 5)
    with pytest.raises(CapacityError):
        with store.writer("a") as w:
            assert json.load(open(_claim_path(store, 0)))["pid"] == os.getpid()
            with pytest.raises(ShardClaimedError, match="this process, through another writer of the shard that is still open"):
                open_store(store.url).writer("a")  # a second writer, even in the same process
            w.add(data, records("a", 5))  # one image too many
    assert not os.path.exists(_claim_path(store, 0))
    w = store.writer("b")
    w.close()  # stopped without committing: released, nothing visible
    assert not os.path.exists(_claim_path(store, 1)) and open_store(store.url).shard("b").state == "writing"
    write_shard(store, "a", 0, 4)
    assert not os.path.exists(_claim_path(store, 0))
    with pytest.raises(ShardStateError, match="already committed"):
        open_store(store.url).writer("a")


def test_a_writer_that_started_before_a_commit_sees_it_and_does_not_rewrite_it(store_factory):
    store = store_factory()
    store.plan_shards([("a", 4)])
    stale = open_store(store.url)  # lists shard a as planned
    write_shard(store, "a", 0, 4)
    with pytest.raises(ShardStateError, match="already committed"):
        stale.writer("a")
    assert open_store(store.url).n_images == 4


def test_a_kill_inside_an_atomic_write_leaves_a_temporary_that_the_next_writer_removes(store_factory):
    store = store_factory()
    store.plan_shards([("a", 6)])
    env = dict(os.environ, PYTHONPATH=HERE, ACTSTORE_KILL_AT="atomic_write:1")  # the write of state `writing`
    p = subprocess.run([sys.executable, os.path.join(HERE, "shard_writer_process.py"), store.url, "a", "0", "6"], env=env)
    assert p.returncode == -9
    group = os.path.join(store.url, "shards", "s000000")
    temps = [n for n in os.listdir(group) if ".tmp-" in n]
    assert len(temps) == 1 and temps[0].startswith("zarr.json.tmp-")
    for name in ("notes.txt", "zarr.json.tmp-mine", "x.tmp-0123"):  # not ours: kept
        open(os.path.join(group, name), "w").write("keep me")
    write_shard(open_store(store.url), "a", 0, 6)
    assert sorted(os.listdir(group)) == ["images.parquet", "moments", "notes.txt", "x.tmp-0123", "zarr.json",
                                         "zarr.json.tmp-mine"]
    assert open_store(store.url).n_images == 6


def test_a_writer_whose_claim_was_taken_over_does_not_commit(store_factory):
    store = store_factory()
    store.plan_shards([("a", 4)])
    w = store.writer("a")
    w.add({k: v[:4] for k, v in shard_data(store, 0, 4).items()}, records("a", 4))
    _fake_claim(store, 0, "gpu-node-7", time.time())  # another writer took it over (this one looked dead)
    with pytest.raises(ShardClaimedError, match=r"lost its claim.*gpu-node-7.*nothing of this writer is committed"):
        w.commit()
    s = open_store(store.url)
    assert s.shard("a").state == "writing" and s.n_images == 0
    assert json.load(open(_claim_path(store, 0)))["host"] == "gpu-node-7"  # the new holder's claim is kept
