"""`ShardWriter.add(wait=False)` (the harvest's writer thread): a batch's chunks are queued and the
next batch can be handed over while they are written. The store is the same, byte for byte, as with
waiting adds; a write that fails is raised (by `wait()` or by `commit()`) and nothing is committed."""

from __future__ import annotations

import numpy as np
import pytest

from activation_store.errors import StorageWriteError
from activation_store.store import open_store
from activation_store.store.stats import Moments
from store_helpers import records, shard_data


def _write(store, source: str, wait: bool, batch: int = 8, fail_at: int | None = None):
    """The shard in batches with statistics given (as a harvest gives them); optionally a chunk write
    that fails at the `fail_at`-th chunk."""
    data, recs = shard_data(store, 3, 40), records(source, 40)
    if fail_at is not None:
        real, calls = store.storage.write_chunk, {"n": 0}

        def failing(key, parts):
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise StorageWriteError(f"injected: no space left on device writing {key}")
            return real(key, parts)

        store.storage.write_chunk = failing
    w = store.writer(source, compute_stats=False)
    pending = []
    for i in range(0, 40, batch):
        part = {k: np.ascontiguousarray(v[i:i + batch]) for k, v in data.items()}
        moments = {k: {"cls": Moments.of(v[:, 0]), "patches": Moments.of(v[:, 1:])} for k, v in part.items()}
        pending.append((w.add(part, recs[i:i + batch], moments=moments, wait=wait), part))
    w.commit()
    return pending


def _objects(url):
    s = open_store(url)
    return {k: s.storage.read_bytes(k) for k in s.storage.list_files("") if "/c/" in k}


def test_queued_writes_give_the_same_store_as_waiting_ones(store_factory):
    a, b = store_factory(), store_factory()
    for s in (a, b):
        s.plan_shards([("src", 40)])
    _write(a, "src", wait=True)
    pending = _write(b, "src", wait=False)
    assert any(p is not None for p, _ in pending)  # the queued path ran
    assert _objects(a.url) == _objects(b.url)
    np.testing.assert_array_equal(open_store(a.url).read_rows("resid_2"), open_store(b.url).read_rows("resid_2"))


def test_a_queued_write_that_fails_stops_the_writer_and_nothing_is_committed(store_factory):
    store = store_factory()
    store.plan_shards([("src", 40)])
    with pytest.raises(StorageWriteError, match="injected"):
        _write(store, "src", wait=False, fail_at=5)
    s = open_store(store.url)
    assert s.n_images == 0 and not s.shard("src").committed
