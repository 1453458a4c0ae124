"""Readers: every token exactly once, disjoint ranks, exact resume, committed rows only, CLS
reads that skip the patches, and normalisations that invert."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from activation_store import OrderedReader, ShuffledReader, open_store
from activation_store.readers import ActivationDataset
from store_helpers import make_store, write_shard

SIZES = (("a", 10), ("b", 7), ("c", 13))  # 30 images; b and c end in partial chunks


@pytest.fixture
def store(tmp_path):
    s = make_store(str(tmp_path / "s"))
    s.plan_shards(list(SIZES))
    data = {}
    for seed, (src, n) in enumerate(SIZES):
        data[src] = write_shard(s, src, seed, n)
    s = open_store(s.url)
    s.test_data = {loc: np.concatenate([data[src][loc] for src, _ in SIZES]).astype(np.float16).astype(np.float32)
                   for loc in s.locations}
    s.test_rows = np.concatenate([np.arange(sh.row_start, sh.row_stop) for sh in s.committed_shards()])
    return s


def value_at(store, loc, ids):
    """Expected vectors for (image_row, token_index) ids."""
    pos = np.searchsorted(store.test_rows, ids[:, 0])
    return store.test_data[loc][pos, ids[:, 1]]


def drain(reader):
    xs, ids = [], []
    for x, i in reader:
        xs.append(x)
        ids.append(i.numpy())
    return xs, (np.concatenate(ids) if ids else np.empty((0, 2), np.int64))


@pytest.mark.parametrize("tokens,per_image", [("all", 17), ("cls", 1), ("patches", 16), ([0, 4, 9], 3)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_every_selected_token_exactly_once_per_epoch(store, tokens, per_image, drop_last):
    reader = ShuffledReader(store, "resid_2", tokens=tokens, batch_size=8, buffer_tokens=60, seed=3,
                            return_ids=True, drop_last=drop_last)
    size = reader.epoch_size()
    xs, ids = drain(reader)
    assert size == {"tokens": len(ids), "batches": len(xs)}
    total = 30 * per_image
    keys = ids[:, 0] * 1000 + ids[:, 1]
    assert len(np.unique(keys)) == len(keys)  # never twice
    if drop_last:
        assert len(keys) == total // 8 * 8 and all(len(x) == 8 for x in xs)
    else:
        assert len(keys) == total and all(len(x) == 8 for x in xs[:-1])
        want_tokens = {0} if tokens == "cls" else set(range(1, 17)) if tokens == "patches" else \
            set(range(17)) if tokens == "all" else set(tokens)
        assert set(ids[:, 1].tolist()) == want_tokens and set(ids[:, 0].tolist()) == set(store.test_rows.tolist())
    np.testing.assert_array_equal(torch.cat(xs).numpy(), value_at(store, "resid_2", ids))


def test_batches_are_shuffled_and_seeded(store):
    def order(seed):
        return drain(ShuffledReader(store, "resid_5", batch_size=16, buffer_tokens=200, seed=seed, return_ids=True))[1]

    a, b, c = order(1), order(1), order(2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[:, 0], np.sort(a[:, 0]))  # not store order
    # a second epoch is a new permutation of the same tokens
    r = ShuffledReader(store, "resid_5", batch_size=16, buffer_tokens=200, seed=1, return_ids=True, epochs=2)
    both = drain(r)[1]
    first, second = both[:510], both[510:]
    assert not np.array_equal(first, second)
    assert sorted(map(tuple, first)) == sorted(map(tuple, second))


@pytest.mark.parametrize("world", [2, 3])
def test_rank_partitions_are_disjoint_and_complete(store, world):
    parts = [drain(ShuffledReader(store, "resid_2", batch_size=8, buffer_tokens=60, seed=5, rank=r,
                                  world_size=world, return_ids=True))[1] for r in range(world)]
    keys = [set((p[:, 0] * 1000 + p[:, 1]).tolist()) for p in parts]
    assert sum(len(k) for k in keys) == 510 == len(set().union(*keys))
    # drop_last gives every rank the same number of batches (DDP would hang otherwise)
    counts = [len(drain(ShuffledReader(store, "resid_2", batch_size=8, buffer_tokens=60, seed=5, rank=r,
                                       world_size=world, return_ids=True, drop_last=True))[0]) for r in range(world)]
    assert len(set(counts)) == 1


def test_a_two_worker_dataloader_yields_no_duplicates(store):
    ds = ActivationDataset(store.url, "resid_2", batch_size=8, buffer_tokens=60, seed=0, return_ids=True)
    loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork")
    ids = np.concatenate([i.numpy() for _, i in loader])
    keys = ids[:, 0] * 1000 + ids[:, 1]
    assert len(keys) == 510 == len(np.unique(keys))


@pytest.mark.parametrize("stop_after", [1, 7, 9, 40])
def test_resume_mid_epoch_gives_the_uninterrupted_sequence(store, stop_after):
    kw = dict(batch_size=8, buffer_tokens=60, seed=11, return_ids=True, epochs=2, tokens="patches")
    full = drain(ShuffledReader(store, "resid_2", **kw))
    first = ShuffledReader(store, "resid_2", **kw)
    it = iter(first)
    head = [next(it) for _ in range(stop_after)]
    state = first.state_dict()
    resumed = ShuffledReader(store, "resid_2", **kw)
    resumed.load_state_dict(state)
    tail = drain(resumed)
    got_ids = np.concatenate([i.numpy() for _, i in head] + [tail[1]])
    np.testing.assert_array_equal(got_ids, full[1])
    torch.testing.assert_close(torch.cat([x for x, _ in head] + tail[0]), torch.cat(full[0]))


def test_resume_refuses_another_configuration(store):
    r = ShuffledReader(store, "resid_2", batch_size=8, seed=1)
    state = r.state_dict()
    other = ShuffledReader(store, "resid_2", batch_size=16, seed=1)
    with pytest.raises(Exception, match="batch_size"):
        other.load_state_dict(state)


def test_a_shard_committed_while_reading_joins_at_the_next_epoch(store):
    store.plan_shards([("late", 6)])
    reader = ShuffledReader(store, "resid_2", batch_size=32, buffer_tokens=100, seed=0, return_ids=True, epochs=2)
    it = iter(reader)
    seen = [next(it)[1].numpy()]
    write_shard(store, "late", 9, 6, commit=False)  # being written: invisible
    seen.append(next(it)[1].numpy())
    write_shard(open_store(store.url), "late", 9, 6)  # committed mid-epoch
    rest = [i.numpy() for _, i in it]
    ids = np.concatenate(seen + rest)
    late_rows = set(range(40, 46))
    first_epoch, second_epoch = ids[:510], ids[510:]
    assert not late_rows & set(first_epoch[:, 0].tolist())
    assert len(second_epoch) == 510 + 6 * 17 and late_rows <= set(second_epoch[:, 0].tolist())


def test_cls_only_reads_a_fiftieth_of_the_bytes(tmp_path):
    from activation_store.store import ActivationStore, ImageRecord, StoreConfig
    from activation_store.synthetic import synthetic_activations

    store = ActivationStore.create(str(tmp_path / "vit"), locations="resid_2", n_tokens=257, d_model=8,
                                   config=StoreConfig(chunk_images=4, region_images=8))
    store.plan_shards(list(SIZES))
    for seed, (src, n) in enumerate(SIZES):
        with store.writer(src) as w:
            w.add({"resid_2": synthetic_activations(seed, n, 257, 8)}, [ImageRecord(f"{src}{i}") for i in range(n)])
    store = open_store(store.url)
    before = store.storage.bytes_read
    drain(OrderedReader(store, "resid_2", tokens="all", batch_size=64))
    full = store.storage.bytes_read - before
    before = store.storage.bytes_read
    cls = drain(OrderedReader(store, "resid_2", tokens="cls", batch_size=64))
    cls_bytes = store.storage.bytes_read - before
    assert full > 30 * 257 * 8 * 2 and cls_bytes * 50 <= full
    np.testing.assert_array_equal(torch.cat(cls[0]).numpy(), store.read_cls("resid_2"))


def test_ordered_reader_is_in_store_order_with_ids(store):
    xs, ids = drain(OrderedReader(store, "resid_5", tokens="all", batch_size=50))
    expect_rows = np.repeat(store.test_rows, 17)
    np.testing.assert_array_equal(ids[:, 0], expect_rows)
    np.testing.assert_array_equal(ids[:, 1], np.tile(np.arange(17), 30))
    np.testing.assert_array_equal(torch.cat(xs).numpy(), store.test_data["resid_5"].reshape(-1, 32))


@pytest.mark.parametrize("mode", ["standardize", "unit_mean_sq_norm"])
@pytest.mark.parametrize("tokens", ["all", "cls"])
def test_normalisations_use_the_store_statistics_and_invert(store, mode, tokens):
    reader = ShuffledReader(store, "resid_2", tokens=tokens, batch_size=1000, normalize=mode, return_ids=True)
    (y, ids), = list(reader)
    x = torch.from_numpy(value_at(store, "resid_2", ids.numpy()))
    norm = reader.normalizer
    torch.testing.assert_close(norm.inverse(y), x, rtol=1e-5, atol=1e-4)
    stats = store.stats("resid_2", tokens)
    x64 = x.double()
    if mode == "standardize":
        np.testing.assert_allclose(norm.shift, stats.mean)
        torch.testing.assert_close(y.double().mean(0), torch.zeros(32, dtype=torch.float64), atol=1e-4, rtol=0)
        torch.testing.assert_close(y.double().std(0, unbiased=False), torch.ones(32, dtype=torch.float64), atol=1e-3, rtol=0)
    else:
        assert float((y.double() ** 2).sum(1).mean()) == pytest.approx(32, rel=1e-5)
        assert float((x64 ** 2).sum(1).mean()) == pytest.approx(stats.mean_sq_norm, rel=1e-6)
    state = norm.state_dict()
    from activation_store.readers import Normalizer

    torch.testing.assert_close(Normalizer.from_state_dict(state).apply(x), y)


def _distributed_worker(rank, world, init_file, store_url, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    reader = ShuffledReader(store_url, "resid_2", batch_size=8, buffer_tokens=60, seed=2, return_ids=True,
                            drop_last=True)
    ids = np.concatenate([i.numpy() for _, i in reader])
    np.save(f"{out_dir}/rank{rank}.npy", ids)
    dist.destroy_process_group()


def test_rank_and_world_come_from_torch_distributed(store, tmp_path):
    import torch.multiprocessing as tmp

    tmp.start_processes(_distributed_worker, args=(2, str(tmp_path / "init"), store.url, str(tmp_path)), nprocs=2,
                        start_method="fork")
    a, b = (np.load(tmp_path / f"rank{r}.npy") for r in (0, 1))
    ka, kb = set((a[:, 0] * 1000 + a[:, 1]).tolist()), set((b[:, 0] * 1000 + b[:, 1]).tolist())
    assert not ka & kb and len(a) == len(b)
    for r, got in ((0, a), (1, b)):  # the same as naming rank and world size explicitly
        want = drain(ShuffledReader(store, "resid_2", batch_size=8, buffer_tokens=60, seed=2, return_ids=True,
                                    drop_last=True, rank=r, world_size=2))[1]
        np.testing.assert_array_equal(got, want)


def test_train_and_eval_splits_are_by_image_disjoint_and_complete(store):
    train = drain(ShuffledReader(store, "resid_2", batch_size=16, seed=0, return_ids=True, split="train", holdout=0.3))[1]
    held = drain(OrderedReader(store, "resid_2", batch_size=16, split="eval", holdout=0.3))[1]
    train_rows, eval_rows = set(train[:, 0].tolist()), set(held[:, 0].tolist())
    assert not train_rows & eval_rows and train_rows | eval_rows == set(store.test_rows.tolist())
    assert 0 < len(eval_rows) < len(train_rows)
    assert len(train) == 17 * len(train_rows) and len(held) == 17 * len(eval_rows)  # whole images on each side


def test_readers_take_a_reader_config_with_keyword_overrides(store):
    from activation_store import ReaderConfig
    from activation_store.errors import ConfigError

    cfg = ReaderConfig(location="resid_2", batch_size=64, seed=3, return_ids=True)
    (xa, ia), (xb, ib) = drain(ShuffledReader(store, cfg)), drain(ShuffledReader(store, "resid_2", batch_size=64,
                                                                                  seed=3, return_ids=True))
    assert len(xa) == len(xb) and all(torch.equal(x, y) for x, y in zip(xa, xb)) and np.array_equal(ia, ib)
    r = ShuffledReader(store, cfg, batch_size=32)
    assert r.cfg.batch_size == 32 and r.cfg.seed == 3 and cfg.batch_size == 64  # the given config is not changed
    r.close()
    with pytest.raises(ConfigError, match="unknown reader settings"):
        ShuffledReader(store, cfg, batchsize=32)
    with pytest.raises(ConfigError, match="shuffle cannot be set"):
        OrderedReader(store, cfg, shuffle=True)
    with pytest.raises(ConfigError, match="needs a location"):
        ShuffledReader(store, ReaderConfig())
    with pytest.raises(ConfigError, match="normalize must be one of"):
        ReaderConfig(location="resid_2", normalize="zscore")


def test_a_reader_that_would_read_forever_without_a_batch_says_so(store):
    from activation_store.errors import NoDataError

    reader = ShuffledReader(store, "resid_2", batch_size=10**7, drop_last=True, epochs=None)
    with pytest.raises(NoDataError, match="fewer than one batch"):
        next(iter(reader))
    reader.close()


def test_one_rank_resolution_for_every_component(monkeypatch, store):
    from activation_store.distributed import resolve_rank
    from activation_store.errors import ConfigError

    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_rank() == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert resolve_rank(launcher_env=True) == (2, 4)  # the harvest's ranks come from the launcher
    reader = ShuffledReader(store, "resid_2")
    assert (reader.rank, reader.world) == (0, 1), "a lone reader in a SLURM job reads all of the data"
    reader.close()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert resolve_rank(launcher_env=True) == (1, 3)  # torchrun's variables before SLURM's
    assert resolve_rank(0, 2, launcher_env=True) == (0, 2)  # explicit values first
    with pytest.raises(ConfigError, match="not in"):
        resolve_rank(5, 2)


# ---------------------------------------------------------------------------- output paths
@pytest.fixture
def split_gathers(monkeypatch):
    """Every gather split between the gather threads (small ones otherwise run in the caller's
    thread), so the split falls inside windows and batches."""
    from activation_store.readers import engine

    monkeypatch.setattr(engine, "INLINE_VALUES", 0)


@pytest.mark.parametrize("storage_dtype", ["fp16", "bf16", "fp32", "fp8"])
@pytest.mark.parametrize("tokens", ["all", "patches", "cls"])
def test_converted_batches_equal_the_storage_dtype_batches_converted(tmp_path, split_gathers, storage_dtype, tokens):
    s = make_store(str(tmp_path / storage_dtype), dtype=storage_dtype)
    s.plan_shards(list(SIZES))
    for seed, (src, n) in enumerate(SIZES):
        write_shard(s, src, seed, n)
    native = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp8": "float32"}[storage_dtype]  # fp8: decoded
    kw = dict(tokens=tokens, batch_size=23, buffer_tokens=60, seed=7, return_ids=True, gather_threads=2)
    raw, raw_ids = drain(ShuffledReader(s, "resid_2", dtype=native, **kw))
    want = torch.cat(raw).float()
    for dtype in ("float32", "bfloat16", "float16"):
        xs, ids = drain(ShuffledReader(s, "resid_2", dtype=dtype, **kw))
        np.testing.assert_array_equal(ids, raw_ids)
        got = torch.cat(xs)
        assert got.dtype == getattr(torch, dtype)
        assert torch.equal(got, want.to(got.dtype)), dtype
    for mode in ("standardize", "unit_mean_sq_norm"):
        r = ShuffledReader(s, "resid_2", dtype="float32", normalize=mode, **kw)
        xs, ids = drain(r)
        np.testing.assert_array_equal(ids, raw_ids)
        assert torch.equal(torch.cat(xs), r.normalizer.apply(want))  # the same ops, bit for bit


def test_every_batch_stays_valid_while_the_caller_holds_it(store, split_gathers):
    """Batch memory is reused only once nothing refers to it: batches kept whole, as views or as
    numpy arrays keep their values while later batches are made."""
    kw = dict(batch_size=8, buffer_tokens=60, seed=3, return_ids=True, drop_last=True)
    for dtype in ("float16", "float32"):
        kept, views, arrays, ids = [], [], [], []
        for i, (x, idx) in enumerate(ShuffledReader(store, "resid_2", dtype=dtype, **kw)):
            ids.append(idx.numpy())
            if i % 3 == 0:
                kept.append((i, x))
            elif i % 3 == 1:
                views.append((i, x[2:5]))
            else:
                arrays.append((i, x.numpy()))
            x = None  # drop our own name for it
        ids = np.concatenate(ids)
        want = value_at(store, "resid_2", ids).reshape(-1, 8, 32)
        for i, x in kept:
            np.testing.assert_array_equal(x.float().numpy(), want[i])
        for i, v in views:
            np.testing.assert_array_equal(v.float().numpy(), want[i][2:5])
        for i, a in arrays:
            np.testing.assert_array_equal(a.astype(np.float32), want[i])


def test_batches_dropped_by_the_caller_reuse_their_memory(store):
    reader = ShuffledReader(store, "resid_2", batch_size=8, buffer_tokens=60, seed=3)
    ptrs = {x.data_ptr() for x in reader}  # each batch dropped before the next is asked for
    assert len(ptrs) <= 4 < 510 // 8
