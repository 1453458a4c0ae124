"""`actstore convert`: re-encoding a store shard by shard into another dtype or codec preset keeps
every image's row and metadata, stores exactly the re-encoded values with their statistics, and is
resumed after a kill -9 to the store an uninterrupted conversion writes."""

import os
import subprocess
import sys

import numpy as np
import pytest

from activation_store.cli import main
from activation_store.errors import ConfigError
from activation_store.store import open_store
from activation_store.store.audit import verify
from activation_store.store.convert import ConvertConfig, convert
from activation_store.store.encoding import dequantize_fp8, quantize_fp8, to_float32, to_storage
from activation_store.store.stats import Moments
from store_helpers import make_store, write_shard

SIZES = (("a", 10), ("b", 7), ("c", 5))


def source(tmp_path, dtype="fp16", codec="none"):
    s = make_store(str(tmp_path / f"src-{dtype}-{codec}"), dtype=dtype, codec=codec)
    s.plan_shards(list(SIZES))
    for seed, (src, n) in enumerate(SIZES):
        write_shard(s, src, seed, n, dropped=seed)
    return open_store(s.url)


def expected(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "fp8":
        return dequantize_fp8(*quantize_fp8(values))
    return to_float32(to_storage(values, dtype), dtype)


def images_of(store):
    t = store.images(include_dropped=True).to_pandas()
    return t.drop(columns=[]).sort_values(["source_shard", "source_row", "key"]).reset_index(drop=True)


@pytest.mark.parametrize("src_dtype,dst_dtype,codec", [
    ("fp16", "fp8", "none"), ("bf16", "fp8", "shuffle-zstd"), ("fp32", "fp8", "zstd"), ("fp8", "fp16", "none"),
    ("fp8", "bf16", "none"), ("fp8", "fp8", "shuffle-zstd"), ("fp16", "bf16", "zstd"), ("fp16", "fp16", "shuffle-zstd"),
    ("bf16", "fp32", "none"), ("fp16", "fp16", "bitround-shuffle-zstd"),
])
def test_convert_re_encodes_every_shard_keeping_rows_images_and_statistics(tmp_path, src_dtype, dst_dtype, codec):
    src = source(tmp_path, src_dtype)
    r = convert(ConvertConfig(src=src.url, dst=str(tmp_path / "dst"), store_dtype=dst_dtype, codec=codec,
                              progress=False))
    dst = open_store(r["dst"])
    assert (dst.dtype, dst.codec.preset, r["converted"], dst.n_images) == (dst_dtype, codec, 3, 22)
    assert dst.row_ranges() == src.row_ranges() and dst.attrs["model"] == src.attrs["model"]
    assert images_of(dst).equals(images_of(src))  # dropped images too, rows unchanged
    for loc in src.locations:
        given = src.read_rows(loc)
        if src_dtype == dst_dtype and not dst.codec.lossy:  # the same bits
            np.testing.assert_array_equal(dst.read_rows(loc, raw=True), src.read_rows(loc, raw=True))
        if dst.codec.lossy:
            assert np.abs(dst.read_rows(loc) - given).max() <= np.abs(given).max() * 2.0**-7
        else:
            np.testing.assert_array_equal(dst.read_rows(loc), expected(given, dst_dtype))
        stats = dst.stats(loc)
        np.testing.assert_allclose(stats.mean, Moments.of(dst.read_rows(loc)).mean, rtol=1e-9, atol=1e-9)
        if dst.lossy:
            assert dst.lossy_error(loc)["complete"]
    if (src_dtype, dst_dtype) == ("fp8", "fp8"):
        assert dst.lossy_error("resid_2") == src.lossy_error("resid_2")  # the codes, and so their error, are SRC's
    assert not verify(dst, progress=False)
    again = convert(ConvertConfig(src=src.url, dst=r["dst"], store_dtype=dst_dtype, codec=codec, progress=False))
    assert again["converted"] == 0 and again["skipped_committed"] == 3


def test_convert_killed_mid_shard_resumes_to_the_uninterrupted_result(tmp_path):
    src = source(tmp_path)
    whole = convert(ConvertConfig(src=src.url, dst=str(tmp_path / "whole"), store_dtype="fp8", progress=False))
    dst = str(tmp_path / "dst")
    cmd = [sys.executable, "-m", "activation_store.cli", "convert", src.url, dst, "--store-dtype", "fp8", "--no-progress"]
    env = {**os.environ, "ACTSTORE_KILL_AT": "convert_batch:2"}  # dies with shard b's batch handed over
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    part = open_store(dst)
    assert [s.state for s in part.shards()] == ["committed", "writing", "planned"] and part.n_images == 10
    env.pop("ACTSTORE_KILL_AT")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "converted 2 of 3" in done.stdout
    a, b = open_store(whole["dst"]), open_store(dst)
    assert images_of(a).equals(images_of(b)) and not verify(b, progress=False)
    for loc in a.locations:
        np.testing.assert_array_equal(b.read_rows(loc, raw=True), a.read_rows(loc, raw=True))
        np.testing.assert_array_equal(b.read_scales(loc), a.read_scales(loc))
        np.testing.assert_array_equal(b.stats(loc).m2, a.stats(loc).m2)
        assert b.lossy_error(loc) == a.lossy_error(loc)


def test_convert_refuses_what_it_cannot_do_in_one_line(tmp_path, capsys):
    src = source(tmp_path)
    assert main(["convert", src.url, src.url, "--store-dtype", "fp8"]) == 2
    assert "DST must differ from SRC" in capsys.readouterr().err
    other = make_store(str(tmp_path / "other"), dtype="bf16")
    assert main(["convert", src.url, other.url, "--store-dtype", "fp8", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "convert into a new path" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="already one byte per value"):
        convert(ConvertConfig(src=src.url, dst=str(tmp_path / "x"), store_dtype="fp8", codec="bitround-shuffle-zstd"))
