"""fp8 stores (format 2.0): codes and per-token scales written by the shard writer, read back
exactly as E4M3[code] * scale, statistics of the stored values, the measured error per shard,
verify over the scale arrays, non-finite input refused, and readers of format 1.x refusing them
with a message that says to upgrade."""

import json

import numpy as np
import pytest
import torch

from activation_store import OrderedReader, ShuffledReader, open_store
from activation_store.errors import ConfigError, NonFiniteActivationError, StoreVersionError
from activation_store.store import StoreConfig, layout
from activation_store.store.audit import format_info, info, verify
from activation_store.store.encoding import E4M3_TABLE, FP8_ERROR_BOUND, dequantize_fp8, quantize_fp8
from activation_store.store.stats import Moments
from activation_store.store.writer import Quantized
from activation_store.synthetic import synthetic_activations
from store_helpers import D, T, make_store, records, shard_data, write_shard

SIZES = (("a", 10), ("b", 7))


def fp8_store(tmp_path, name="s", **config):
    s = make_store(str(tmp_path / name), dtype="fp8", **config)
    s.plan_shards(list(SIZES))
    data = {src: write_shard(s, src, seed, n) for seed, (src, n) in enumerate(SIZES)}
    s = open_store(s.url)
    s.given = {loc: np.concatenate([data[src][loc] for src, _ in SIZES]) for loc in s.locations}
    return s


@pytest.mark.parametrize("codec", ["none", "shuffle-zstd"])
def test_reads_return_e4m3_codes_times_their_token_scales(tmp_path, codec):
    s = fp8_store(tmp_path, codec=codec)
    assert s.attrs["format_version"] == "2.0" and s.attrs["physical_dtype"] == "uint8" and s.quantized
    for loc in s.locations:
        codes, scales = quantize_fp8(s.given[loc])
        want = E4M3_TABLE[codes] * scales[..., None]
        np.testing.assert_array_equal(s.read_rows(loc), want)
        np.testing.assert_array_equal(s.read_rows(loc, raw=True), codes)
        np.testing.assert_array_equal(s.read_scales(loc), scales)
        np.testing.assert_array_equal(s.read_cls(loc), want[:, 0])
        np.testing.assert_array_equal(s.read_scales(loc, cls=True), scales[:, 0])
        np.testing.assert_array_equal(s.read_rows(loc, 2, 5, tokens=slice(1, 4)), want[2:5, 1:4])
        ref = s.chunk_refs(loc)[1]
        np.testing.assert_array_equal(s.read_chunk(loc, ref.index), want[4:8])


def test_scales_are_companion_arrays_chunked_like_their_data_with_checksums(tmp_path):
    s = fp8_store(tmp_path, codec="zstd")
    for key, chunks in ((layout.array_key("resid_2"), [4, T]), (layout.cls_array_key("resid_2"), [8])):
        doc = json.load(open(f"{s.url}/{layout.node_key(layout.scale_array_key(key))}"))
        assert doc["data_type"] == "float32" and doc["chunk_grid"]["configuration"]["chunk_shape"] == chunks
        assert [c["name"] for c in doc["codecs"]] == ["bytes", "zstd", "crc32c"]
        assert doc["attributes"]["activation_store"]["scales_of"] == key
        main = json.load(open(f"{s.url}/{layout.node_key(key)}"))
        assert main["attributes"]["activation_store"]["scales"] == layout.scale_array_key(key)
        assert "e4m3" in main["attributes"]["activation_store"]["encoding"]
    assert not verify(s, progress=False)
    victim = f"{s.url}/scales/resid_5/c/1/0"
    raw = bytearray(open(victim, "rb").read())
    raw[0] ^= 1
    open(victim, "wb").write(raw)
    problems = [str(p) for p in verify(s, progress=False)]
    assert len(problems) == 1 and "scales/resid_5/c/1/0" in problems[0] and "crc32c" in problems[0]
    import os
    os.remove(f"{s.url}/scales/cls/resid_2/c/1")
    assert any("scales/cls/resid_2/c/1: missing" in str(p) for p in verify(s, progress=False))


def test_statistics_and_the_measured_error_are_of_the_stored_values(tmp_path):
    s = fp8_store(tmp_path)
    for loc in s.locations:
        stored = s.read_rows(loc)
        got = s.stats(loc, "patches")
        want = Moments.of(stored[:, 1:])
        np.testing.assert_allclose(got.mean, want.mean, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(got.m2, want.m2, rtol=1e-9)
        np.testing.assert_array_equal(got.absmax, want.absmax)
        err = stored - s.given[loc]
        e = s.lossy_error(loc)
        assert e["complete"] and e["bound"] == FP8_ERROR_BOUND
        assert e["max_abs"] == pytest.approx(float(np.abs(err).max()))
        assert e["relative_rmse"] == pytest.approx(float(np.sqrt((err.astype(np.float64) ** 2).sum()
                                                                 / (s.given[loc].astype(np.float64) ** 2).sum())))
        for shard in s.committed_shards():
            assert set(shard.commit["lossy_error"][loc]) == {"max_abs", "max_rel", "sum_sq_err", "sum_sq"}
    text = format_info(info(s))
    assert "fp8 quantisation error: max rel" in text and "relative RMSE" in text


def test_bytes_per_value_with_scales_included_at_vit_width(tmp_path):
    from activation_store.store import ActivationStore

    s = ActivationStore.create(str(tmp_path / "w"), locations="resid_1", n_tokens=5, d_model=1024,
                               config=StoreConfig(dtype="fp8", chunk_images=16, region_images=32))
    s.plan_shards([("a", 32)])
    with s.writer("a") as w:
        w.add({"resid_1": synthetic_activations(0, 32, 5, 1024)}, records("a", 32))
    entry = info(open_store(s.url))["per_location"]["resid_1"]
    assert entry["bytes_per_value"] <= 1.005  # 1 byte a value, 4 bytes a token of 1,024, 4 a chunk


def test_codes_quantised_elsewhere_store_the_same_bytes_and_their_error(tmp_path):
    a = fp8_store(tmp_path, "a")
    b = make_store(str(tmp_path / "b"), dtype="fp8")
    b.plan_shards(list(SIZES))
    for seed, (src, n) in enumerate(SIZES):
        data = shard_data(b, seed, n)
        with b.writer(src) as w:
            w.add({loc: Quantized(*quantize_fp8(x)) for loc, x in data.items()}, records(src, n))
            if src == "a":
                w.add_lossy_error(a.shard("a").commit["lossy_error"])
    b = open_store(b.url)
    for loc in a.locations:
        np.testing.assert_array_equal(b.read_rows(loc, raw=True), a.read_rows(loc, raw=True))
        np.testing.assert_array_equal(b.read_scales(loc), a.read_scales(loc))
    assert b.shard("a").commit["lossy_error"] == a.shard("a").commit["lossy_error"]
    assert b.shard("b").commit["lossy_error_complete"] is False and not b.lossy_error("resid_2")["complete"]


def test_non_finite_or_out_of_range_input_is_refused_and_nothing_is_committed(tmp_path):
    s = make_store(str(tmp_path / "s"), dtype="fp8")
    s.plan_shards([("a", 4)])
    for bad in (np.nan, np.inf, 1e39):
        x = {loc: synthetic_activations(0, 4, T, D).astype(np.float64) for loc in s.locations}
        x["resid_5"][2, 3, 4] = bad
        w = s.writer("a")
        with pytest.raises(NonFiniteActivationError, match=r"a/00002.*NaN/inf"):
            w.add(x, records("a", 4))
        w.close()
    assert s.n_images == 0 and not s.shards(refresh=True)[0].committed


def test_an_interrupted_fp8_shard_is_redone_with_the_same_bytes(tmp_path):
    a = fp8_store(tmp_path, "a")
    b = make_store(str(tmp_path / "b"), dtype="fp8")
    b.plan_shards(list(SIZES))
    write_shard(b, "a", 0, 10, commit=False)  # chunks and scales written, never committed
    for seed, (src, n) in enumerate(SIZES):
        write_shard(b, src, seed, n)
    b = open_store(b.url)
    for loc in a.locations:
        np.testing.assert_array_equal(b.read_rows(loc), a.read_rows(loc))
    assert not verify(b, progress=False)


def test_readers_of_format_1_refuse_an_fp8_store_and_say_to_upgrade(tmp_path):
    s = fp8_store(tmp_path)
    assert open_store(s.url).n_images == 17  # this software reads 2.0
    fp16 = make_store(str(tmp_path / "fp16"))
    assert fp16.attrs["format_version"] == "1.1"  # only fp8 stores need the new MAJOR version
    # a 1.x reader: the same check with the versions it knows
    with pytest.raises(StoreVersionError, match=r"format 2\.0.*reads format 1\.x only; upgrade activation-store"):
        layout.check_format_version(s.attrs["format_version"], s.url, "0.2.0", known_majors=(1,))
    layout.check_format_version(fp16.attrs["format_version"], fp16.url, "0.2.0", known_majors=(1,))
    meta = f"{s.url}/zarr.json"
    doc = json.load(open(meta))
    doc["attributes"]["activation_store"]["format_version"] = "3.0"
    json.dump(doc, open(meta, "w"))
    with pytest.raises(StoreVersionError, match=r"format 3\.0.*reads format 1\.x and 2\.x only; upgrade"):
        open_store(s.url)


def test_fp8_settings_that_make_no_sense_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="already one byte per value"):
        StoreConfig(dtype="fp8", codec="bitround-shuffle-zstd")
    with pytest.raises(ConfigError, match="no scales"):
        make_store(str(tmp_path / "f"), dtype="fp16").read_scales("resid_2")


def test_every_code_decodes_in_the_reader_as_the_table_says(tmp_path):
    """The readers' fast decoding (16-bit expansion, one float32 multiplication) equals
    E4M3[code] * scale for every finite code and scales from tiny to huge."""
    s = make_store(str(tmp_path / "s"), locations="resid_1", dtype="fp8")
    n = 8
    codes = np.resize(np.array([c for c in range(256) if c & 0x7F != 0x7F], np.uint8), (n, T, D))
    scales = np.float32(10.0) ** np.random.default_rng(0).uniform(-30, 30, (n, T)).astype(np.float32)
    s.plan_shards([("a", n)])
    with s.writer("a") as w:
        w.add({"resid_1": Quantized(codes, scales)}, records("a", n))
    s = open_store(s.url)
    want = torch.from_numpy(dequantize_fp8(codes, scales).reshape(-1, D))
    for dtype in ("float32", "bfloat16", "float16"):
        got = torch.cat([x for x, _ in OrderedReader(s, "resid_1", batch_size=50, dtype=dtype)])
        assert torch.equal(got, want.to(got.dtype)), dtype


@pytest.mark.parametrize("stop_after", [1, 9])
def test_shuffled_fp8_reads_resume_exactly_and_split_across_ranks(tmp_path, stop_after):
    s = fp8_store(tmp_path)
    kw = dict(batch_size=8, buffer_tokens=60, seed=3, return_ids=True, normalize="standardize")
    full = [(x.clone(), i.clone()) for x, i in ShuffledReader(s, "resid_2", **kw)]
    r = ShuffledReader(s, "resid_2", **kw)
    it = iter(r)
    head = [next(it) for _ in range(stop_after)]
    state = r.state_dict()
    r2 = ShuffledReader(s, "resid_2", **kw)
    r2.load_state_dict(state)
    got = head + list(r2)
    assert len(got) == len(full)
    for (x, i), (y, j) in zip(got, full):
        assert torch.equal(x, y) and torch.equal(i, j)
    ids = [torch.cat([i for _, i in ShuffledReader(s, "resid_2", rank=k, world_size=2, **kw)]) for k in range(2)]
    keys = [set((i[:, 0] * 100 + i[:, 1]).tolist()) for i in ids]
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == 17 * T
