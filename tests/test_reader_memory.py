"""The reader's memory budget: `memory` sizes the two windows after the fixed buffers, the buffers
it allocates are what it reports, resume compares the windows however they were sized, and the
setting is a flag (`--reader-memory 1GB`) and a config-file value like every other."""

import argparse

import pytest
import torch

from activation_store import ReaderConfig, ShuffledReader, open_store
from activation_store.configs import add_arguments, from_dict, overrides_from_args
from activation_store.errors import ConfigError
from activation_store.readers.config import parse_bytes
from store_helpers import make_store, write_shard

SIZES = (("a", 10), ("b", 7), ("c", 13))
TOKEN_BYTES = 32 * 2  # d 32, fp16


@pytest.fixture
def store(tmp_path):
    s = make_store(str(tmp_path / "s"))
    s.plan_shards(list(SIZES))
    for seed, (src, n) in enumerate(SIZES):
        write_shard(s, src, seed, n)
    return open_store(s.url)


def test_sizes_parse_with_units():
    assert parse_bytes("1GB") == 10**9 and parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("1.5e9") == 1_500_000_000
    assert parse_bytes("none") is None and parse_bytes(4096) == 4096
    with pytest.raises(ConfigError, match="memory size"):
        parse_bytes("lots")
    assert ReaderConfig(memory="64kB").memory == 64_000


@pytest.mark.parametrize("threads,gather", [(1, 1), (4, 2)])
def test_memory_sizes_the_two_windows_after_the_fixed_buffers(store, threads, gather):
    budget = 4_000_000
    reader = ShuffledReader(store, "resid_2", memory=budget, threads=threads, gather_threads=gather, batch_size=8)
    plan = reader.memory_plan()
    fixed = plan["fixed_bytes"]
    assert fixed == 0  # local, uncompressed, all tokens: no buffer but the windows (the fused gather needs no scratch)
    assert reader.window_tokens == (budget - fixed) // (2 * TOKEN_BYTES)
    assert plan["total_bytes"] <= budget
    assert [b.nbytes for b in reader.engine.buffers] == [plan["window_bytes"]] * 2
    assert plan["window_bytes"] == reader.window_tokens * TOKEN_BYTES
    reader.close()
    # a token subset packed out of whole chunks also budgets a staging chunk per thread
    sub = ShuffledReader(store, "resid_2", tokens=[0, 3], memory=budget * 4, threads=threads, gather_threads=gather,
                         batch_size=8)
    chunk_bytes = 4 * 17 * TOKEN_BYTES
    assert sub.memory_plan()["fixed"]["staging"] == threads * chunk_bytes
    assert sub.memory_plan()["total_bytes"] <= budget * 4
    sub.close()


def test_memory_too_small_for_one_chunk_a_window_says_what_it_needs(store):
    with pytest.raises(ConfigError, match=r"too small for this store.*need"):
        ShuffledReader(store, "resid_2", memory=5_000, threads=1, gather_threads=1)  # two chunks need 8,704


def test_memory_sized_windows_read_like_the_same_buffer_tokens(store):
    kw = dict(batch_size=8, seed=5, return_ids=True, threads=1, gather_threads=1)
    budget = 2 * 200 * TOKEN_BYTES  # windows of 200 tokens: 2 chunks of 68, of 510 tokens in all
    by_memory = ShuffledReader(store, "resid_2", memory=budget, **kw)
    tokens = by_memory.window_tokens
    assert tokens == (budget - by_memory.memory_plan()["fixed_bytes"]) // (2 * TOKEN_BYTES)
    assert tokens == 200
    by_tokens = ShuffledReader(store, "resid_2", buffer_tokens=tokens, **kw)
    for (xa, ia), (xb, ib) in zip(by_memory, by_tokens, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ia, ib)


def test_resume_compares_the_windows_however_they_were_sized(store):
    kw = dict(batch_size=8, seed=5, return_ids=True, threads=1, gather_threads=1)
    memory = 2 * 150 * TOKEN_BYTES
    first = ShuffledReader(store, "resid_2", memory=memory, **kw)
    it = iter(first)
    head = [next(it) for _ in range(5)]
    state = first.state_dict()
    assert state["window_tokens"] == first.window_tokens
    same = ShuffledReader(store, "resid_2", buffer_tokens=first.window_tokens, **kw)  # the same windows
    same.load_state_dict(state)
    full = list(ShuffledReader(store, "resid_2", memory=memory, **kw))
    tail = list(same)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(head + tail, full, strict=True))
    other = ShuffledReader(store, "resid_2", memory=2 * 100 * TOKEN_BYTES, **kw)
    with pytest.raises(ConfigError, match="buffer_tokens"):
        other.load_state_dict(state)


def test_memory_is_a_flag_and_a_config_value():
    p = argparse.ArgumentParser()
    add_arguments(p, ReaderConfig)
    args = p.parse_args(["--reader-memory", "1GB", "--io-concurrency", "16", "--prefetch", "32",
                         "--io-attempts", "3", "--io-timeout", "5", "--no-readahead", "--gather-threads", "2"])
    cfg = from_dict(ReaderConfig, overrides_from_args(args, ReaderConfig))
    assert (cfg.memory, cfg.io_concurrency, cfg.prefetch, cfg.io_attempts, cfg.io_timeout, cfg.readahead,
            cfg.gather_threads) == (10**9, 16, 32, 3, 5.0, False, 2)
    assert from_dict(ReaderConfig, {"memory": "512MiB"}).memory == 512 * 2**20
    with pytest.raises(SystemExit):
        p.parse_args(["--reader-memory", "lots"])


def test_the_trainer_offers_the_reader_memory_flag():
    from activation_store.sae.trainer import TrainerConfig

    p = argparse.ArgumentParser()
    add_arguments(p, TrainerConfig)
    args = p.parse_args(["--reader-memory", "2GB"])
    assert overrides_from_args(args, TrainerConfig)["reader"]["memory"] == 2 * 10**9
