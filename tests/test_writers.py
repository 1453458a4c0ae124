"""Many writers, one store; a writer killed mid-write leaves nothing visible and can be redone."""

import os
import signal
import subprocess
import sys

import numpy as np

from activation_store.store import open_store
from activation_store.store.layout import shard_images_key
from store_helpers import shard_data, write_shard

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


def test_killed_writer_is_invisible_and_rewrite_gives_the_same_bytes(store_factory):
    reference = store_factory(codec="zstd")
    reference.plan_shards([("a", 6), ("b", 15)])
    write_shard(reference, "a", 0, 6, batch=2, dropped=1)
    write_shard(reference, "b", 1, 15, batch=2, dropped=1)

    store = store_factory(codec="zstd")
    store.plan_shards([("a", 6), ("b", 15)])
    write_shard(store, "a", 0, 6, batch=2, dropped=1)
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
    got, want = _store_bytes(s), _store_bytes(reference)
    assert sorted(got) == sorted(want)
    for k in want:
        if k.endswith(".parquet"):
            continue  # parquet embeds no timestamps but compare its table, not its writer's bytes
        assert got[k] == want[k], k
    assert s.images(include_dropped=True).equals(open_store(reference.url).images(include_dropped=True))


def test_a_rerun_after_a_crash_removes_stale_chunks_beyond_the_new_data(store_factory):
    store = store_factory()
    store.plan_shards([("a", 16)])
    write_shard(store, "a", 0, 16, commit=False)  # a first attempt got 16 images in, then died
    write_shard(store, "a", 0, 5)  # the rerun stored only 5 (say the source changed)
    s = open_store(store.url)
    chunk_keys = [k for k in s.storage.list_files("resid_2/c")]
    assert len(chunk_keys) == 2  # rows 0-3 and 4: nothing left from the first attempt
    assert s.n_images == 5
