"""Other array clients read a store: our xarray view (`ActivationStore.to_xarray`), raw
`xarray.open_zarr` plus the decoding the array attributes and docs/format.md give, and tensorstore's
zarr3 driver. All with the real libraries."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import xarray as xr
import zarr

from activation_store.errors import ChunkMissingError, ConfigError, RowsNotCommittedError, UnknownLocationError
from activation_store.store import ActivationStore, StoreConfig, open_store
from activation_store.store.encoding import BF16_ENCODING
from store_helpers import make_store, write_shard

DTYPES = ["fp32", "fp16", "bf16"]


def two_shard_store(factory, **config):
    """Shards a (10 images) and b (5), with region padding between them, and an uncommitted shard c."""
    store = factory(**config)
    store.plan_shards([("a", 10), ("b", 5), ("c", 4)])
    write_shard(store, "a", 1, 10)
    write_shard(store, "b", 2, 5)
    write_shard(store, "c", 3, 4, commit=False)  # its chunks are written, but it is not committed
    return open_store(store.url)


def count_chunk_reads(monkeypatch, store) -> list:
    """Every chunk the store reads from now on, as (array key, chunk index)."""
    reads = []
    inner = store.fetch_chunk_into

    def counting(array_key, index, out, what=None):
        reads.append((array_key, index))
        return inner(array_key, index, out, what)

    monkeypatch.setattr(store, "fetch_chunk_into", counting)
    return reads


def decode_raw(raw: np.ndarray, logical_dtype: str) -> np.ndarray:
    """docs/format.md's decoding, numpy alone."""
    if logical_dtype == "bf16":
        assert raw.dtype == np.uint16
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_to_xarray_equals_read_rows_exactly(store_factory, dtype):
    s = two_shard_store(store_factory, dtype=dtype)
    for loc in s.locations:
        da = s.to_xarray(loc)
        assert isinstance(da, xr.DataArray) and da.dtype == np.float32
        assert da.dims == ("image", "token", "channel") and da.shape == (15, 17, 32)
        np.testing.assert_array_equal(da.values, s.read_rows(loc))  # the uncommitted shard c is not there
        assert da.values.tobytes() == s.read_rows(loc).tobytes()  # bit for bit (NaN-free, but -0.0 too)
        np.testing.assert_array_equal(da.row.values, np.r_[0:10, 16:21])  # array rows: padding skipped
        np.testing.assert_array_equal(da.token.values, np.arange(17))
        assert da.attrs["location"] == loc and da.attrs["stored_dtype"] == dtype and da.attrs["tokens"] == "all"
        assert da.attrs["physical_dtype"] == ("uint16" if dtype == "bf16" else {"fp16": "float16", "fp32": "float32"}[dtype])
        assert da.attrs["model"] == {"name": "test", "pretrained": "none"}
        # selections across the shard boundary, of tokens and channels, in any order
        full = s.read_rows(loc)
        np.testing.assert_array_equal(da.isel(image=slice(8, 13)).values, full[8:13])
        np.testing.assert_array_equal(da.isel(image=[14, 0, 11, 11], token=slice(1, None, 4), channel=[3, 1]).values,
                                      full[[14, 0, 11, 11]][:, 1::4][:, :, [3, 1]])
        np.testing.assert_array_equal(da.isel(image=-1, token=0).values, full[-1, 0])
        np.testing.assert_array_equal(da[3:12:4, 5, ::-1].values, full[3:12:4, 5, ::-1])
        # a row range, as read_rows takes it
        np.testing.assert_array_equal(s.to_xarray(loc, rows=(2, 9)).values, s.read_rows(loc, 2, 9))
        np.testing.assert_array_equal(s.to_xarray(loc, rows=slice(4, None)).values, s.read_rows(loc, 4))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cls_view_equals_read_cls_and_token_zero(store_factory, dtype):
    s = two_shard_store(store_factory, dtype=dtype)
    loc = "resid_5"
    cls = s.to_xarray(loc, tokens="cls")
    assert cls.dims == ("image", "channel") and cls.dtype == np.float32 and cls.attrs["tokens"] == "cls"
    assert cls.attrs["array"] == f"cls/{loc}" and int(cls.token) == 0
    np.testing.assert_array_equal(cls.values, s.read_cls(loc))
    np.testing.assert_array_equal(cls.values, s.to_xarray(loc).isel(token=0).values)
    np.testing.assert_array_equal(cls.row.values, s.to_xarray(loc).row.values)
    np.testing.assert_array_equal(s.to_xarray(loc, tokens="cls", rows=(17, 20)).values, s.read_cls(loc, 17, 20))


@pytest.mark.parametrize("dtype,keepbits", [("fp16", 7), ("bf16", 5)])
def test_lossy_preset_reads_as_read_rows_does(store_factory, dtype, keepbits):
    s = two_shard_store(store_factory, dtype=dtype, codec="bitround-shuffle-zstd", keepbits=keepbits)
    da = s.to_xarray("resid_2")
    assert da.attrs["lossy"] and da.attrs["error_bound"] == s.codec.error_bound()
    np.testing.assert_array_equal(da.values, s.read_rows("resid_2"))
    np.testing.assert_array_equal(s.to_xarray("resid_2", tokens="cls").values, s.read_cls("resid_2"))


def test_dataset_of_every_location_and_image_keys(store_factory):
    s = two_shard_store(store_factory, dtype="bf16", codec="zstd")
    ds = s.to_xarray_dataset(image_keys=True)
    assert list(ds.data_vars) == s.locations and ds.attrs["stored_dtype"] == "bf16"
    for loc in s.locations:
        np.testing.assert_array_equal(ds[loc].values, s.read_rows(loc))
    table = s.images()
    assert ds.key.values.tolist() == table["key"].to_pylist() and ds.row.values.tolist() == table["row"].to_pylist()
    # select by image key or by array row with xarray's own indexes
    one = ds.set_xindex("key").sel(key="b/00002")
    np.testing.assert_array_equal(one["resid_2"].values, s.read_rows("resid_2", 18, 19)[0])
    np.testing.assert_array_equal(ds.set_xindex("row").sel(row=[9, 16])["resid_5"].values,
                                  s.read_rows("resid_5")[[9, 10]])


def test_opening_reads_no_chunk_and_slicing_reads_only_the_chunks_it_needs(store_factory, monkeypatch):
    s = two_shard_store(store_factory, dtype="bf16")
    reads = count_chunk_reads(monkeypatch, s)
    da = s.to_xarray("resid_2")
    cls = s.to_xarray("resid_2", tokens="cls")
    ds = s.to_xarray_dataset()
    view = da.isel(image=slice(9, 12), token=[0, 4])  # still lazy: indexing composes, reads nothing
    assert reads == [] and view.shape == (3, 2, 32) and repr(da) and repr(ds)
    view.values  # rows 9, 16, 17: chunk 2 (rows 8-11) and chunk 4 (rows 16-19), each once
    assert reads == [("resid_2", 2), ("resid_2", 4)]
    reads.clear()
    da.isel(image=0, token=3, channel=7).values
    assert reads == [("resid_2", 0)]
    reads.clear()
    cls.isel(image=slice(0, 15)).values  # the CLS array: chunks of region_images (8) rows
    assert reads == [("cls/resid_2", 0), ("cls/resid_2", 1), ("cls/resid_2", 2)]
    reads.clear()
    da.values
    assert reads == [("resid_2", c.index) for c in s.chunk_refs("resid_2")]  # each chunk once, none of shard c


def test_a_missing_chunk_fails_only_the_reads_that_need_it(store_factory):
    s = two_shard_store(store_factory, dtype="fp16")
    os.remove(os.path.join(s.url, "resid_2", "c", "4", "0", "0"))  # rows 16-19, of shard b
    da = s.to_xarray("resid_2")  # opens: it reads no chunk
    np.testing.assert_array_equal(da.isel(image=slice(0, 10)).values, s.read_rows("resid_2", 0, 10))
    with pytest.raises(ChunkMissingError, match="resid_2/c/4/0/0"):
        da.isel(image=11).values


def test_a_2_5_tb_store_opens_and_slices_lazily(tmp_path, monkeypatch):
    """A ViT-L-sized store of 4.75 M images (2.5 TB of bf16): one shard written for real, a second
    one recorded as committed whose chunks do not exist. Opening and slicing read only what is asked."""
    n_big, t, d = 4_750_000, 257, 1024
    store = ActivationStore.create(str(tmp_path / "big"), locations="resid_22", n_tokens=t, d_model=d,
                                   config=StoreConfig(dtype="bf16", chunk_images=16, region_images=16))
    store.plan_shards([("a", 3), ("b", n_big)])
    write_shard(store, "a", 1, 3)
    meta = tmp_path / "big" / "shards" / "s000001" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["activation_store_shard"].update(state="committed", commit={"n_rows": n_big})
    meta.write_text(json.dumps(doc))
    s = open_store(store.url)
    reads = count_chunk_reads(monkeypatch, s)
    started = time.perf_counter()
    da = s.to_xarray("resid_22")
    opened = time.perf_counter() - started
    assert da.shape == (n_big + 3, t, d) and da.nbytes == (n_big + 3) * t * d * 4 and reads == []
    assert da.nbytes // 2 > 2.5e12  # bytes stored
    assert opened < 5, f"opening took {opened:.1f} s"
    first = da.isel(image=slice(0, 3)).values
    assert reads == [("resid_22", 0)]
    np.testing.assert_array_equal(first, s.read_rows("resid_22", 0, 3))
    reads.clear()
    assert int(da.row[3 + 16 * 199_999]) == 3_200_000  # shard b starts at row 16, image 3
    with pytest.raises(ChunkMissingError, match="resid_22/c/200000/0/0"):  # rows 3,200,000-3,200,015
        da.isel(image=3 + 16 * 199_999, token=0).values
    assert reads == [("resid_22", 200_000)]


def test_bad_arguments_are_named(store_factory):
    s = two_shard_store(store_factory)
    with pytest.raises(ConfigError, match="tokens must be"):
        s.to_xarray("resid_2", tokens="patches")
    with pytest.raises(RowsNotCommittedError):
        s.to_xarray("resid_2", rows=(8, 18))  # runs into the padding after shard a
    with pytest.raises(ConfigError, match="step 1"):
        s.to_xarray("resid_2", rows=slice(0, 10, 2))
    with pytest.raises(UnknownLocationError):
        s.to_xarray("resid_9")


def test_an_empty_store_is_an_empty_view(store_factory):
    s = store_factory(dtype="bf16")
    da = s.to_xarray("resid_2")
    assert da.shape == (0, 17, 32) and da.values.shape == (0, 17, 32) and da.dtype == np.float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_raw_open_zarr_plus_the_documented_decoding_gives_the_same_floats(store_factory, dtype):
    s = two_shard_store(store_factory, dtype=dtype)
    raw = xr.open_zarr(s.url, consolidated=False)
    raw_cls = xr.open_zarr(s.url, consolidated=False, group="cls")
    for loc in s.locations:
        meta = raw[loc].attrs["activation_store"]
        assert meta["logical_dtype"] == dtype
        if dtype == "bf16":
            assert raw[loc].dtype == np.uint16 and raw_cls[loc].dtype == np.uint16  # xarray does not decode it
            assert meta["encoding"] == BF16_ENCODING and "<< 16" in meta["encoding"]
            assert raw_cls[loc].attrs["activation_store"]["encoding"] == BF16_ENCODING
        else:
            assert "encoding" not in meta  # the stored numbers are the values
        view = s.to_xarray(loc)
        rows = view.row.values  # raw arrays hold every planned row; the committed ones come from the manifest
        np.testing.assert_array_equal(decode_raw(raw[loc].values[rows], dtype), view.values)
        np.testing.assert_array_equal(decode_raw(raw_cls[loc].values[rows], dtype), s.to_xarray(loc, tokens="cls").values)
        assert raw[loc].dims == view.dims


def test_tensorstore_reads_the_chunk_bytes_zarr_reads(store_factory):
    ts = pytest.importorskip("tensorstore")
    s = two_shard_store(store_factory, dtype="bf16", codec="shuffle-zstd")
    for key in ("resid_2", "cls/resid_2"):
        arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(s.url, key)}},
                      read=True).result()
        got = arr.read().result()
        want = zarr.open_array(s.url, path=key, mode="r")[:]
        assert got.dtype == np.uint16 and got.shape == want.shape
        assert got.tobytes() == want.tobytes()  # padding and uncommitted rows (fill value) included
    assert list(arr.domain.labels) == ["image", "channel"]
    view = s.to_xarray("resid_2", tokens="cls")
    np.testing.assert_array_equal(decode_raw(got[view.row.values], "bf16"), view.values)


def test_the_store_imports_xarray_only_when_asked():
    code = ("import sys, activation_store.store, activation_store.store.activation_store\n"
            "assert 'xarray' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("codec", ["none", "shuffle-zstd"])
def test_fp8_view_decodes_codes_times_scales_as_read_rows(store_factory, monkeypatch, codec):
    """fp8 (codes + a float32 scale per token): the view is float32, equal to read_rows / read_cls bit
    for bit under every selection, reading only the selected chunks and their scale chunks.
    Through xarray_view.open_dataarray: ActivationStore.to_xarray still refuses fp8 (`_check_xarray`)."""
    from activation_store.store.xarray_view import open_dataarray, open_dataset

    s = two_shard_store(store_factory, dtype="fp8", codec=codec)
    assert s.quantized
    for loc in s.locations:
        da = open_dataarray(s, loc)
        full = s.read_rows(loc)
        assert da.dtype == np.float32 and da.shape == (15, 17, 32) and full.dtype == np.float32
        assert da.values.tobytes() == full.tobytes()
        np.testing.assert_array_equal(da.row.values, np.r_[0:10, 16:21])
        assert da.attrs["stored_dtype"] == "fp8" and da.attrs["physical_dtype"] == "uint8" and da.attrs["lossy"]
        assert da.attrs["scale_array"] == f"scales/{loc}" and da.attrs["error_bound"] == s.codec.error_bound()
        # the decoding is codes x scale per token
        codes, scales = s.read_rows(loc, raw=True), s.read_scales(loc)
        from activation_store.store.encoding import E4M3_TABLE
        np.testing.assert_array_equal(da.values, E4M3_TABLE[codes] * scales[..., None])
        for sel, want in (
                (dict(image=slice(8, 13)), full[8:13]),
                (dict(image=[14, 0, 11, 11], token=slice(1, None, 4), channel=[3, 1]),
                 full[[14, 0, 11, 11]][:, 1::4][:, :, [3, 1]]),
                (dict(image=-1, token=0), full[-1, 0]),
                (dict(image=slice(2, 12), channel=5), full[2:12, :, 5]),  # channel axis dropped: scale per value
                (dict(image=3, token=4, channel=7), full[3, 4, 7]),
                (dict(token=[16, 2]), full[:, [16, 2]])):
            got = da.isel(**sel).values
            assert got.shape == want.shape and got.tobytes() == want.tobytes(), sel
        np.testing.assert_array_equal(da[3:12:4, 5, ::-1].values, full[3:12:4, 5, ::-1])
        np.testing.assert_array_equal(open_dataarray(s, loc, rows=(2, 9)).values, s.read_rows(loc, 2, 9))
        cls = open_dataarray(s, loc, tokens="cls")
        assert cls.attrs["scale_array"] == f"scales/cls/{loc}"
        assert cls.values.tobytes() == s.read_cls(loc).tobytes()
        np.testing.assert_array_equal(cls.isel(image=[1, 12], channel=[0, 31]).values, s.read_cls(loc)[[1, 12]][:, [0, 31]])
        np.testing.assert_array_equal(open_dataarray(s, loc, tokens="cls", rows=(17, 20)).values, s.read_cls(loc, 17, 20))
    ds = open_dataset(s, image_keys=True)
    assert ds.attrs["stored_dtype"] == "fp8" and ds.attrs["lossy"]
    np.testing.assert_array_equal(ds["resid_5"].values, s.read_rows("resid_5"))
    reads = count_chunk_reads(monkeypatch, s)
    view = open_dataarray(s, "resid_2").isel(image=slice(9, 12), token=[0, 4])
    assert reads == []
    view.values  # rows 9, 16, 17: chunks 2 and 4, each with its scales
    assert reads == [("resid_2", 2), ("scales/resid_2", 2), ("resid_2", 4), ("scales/resid_2", 4)]


def test_to_xarray_of_an_fp8_store(store_factory):
    """ActivationStore.to_xarray of an fp8 store is the decoded float32 view, equal to read_rows and
    read_cls, lossy and saying so."""
    s = two_shard_store(store_factory, dtype="fp8")
    da = s.to_xarray("resid_2")
    assert da.dtype == np.float32 and da.attrs.get("lossy") is True
    assert da.values.tobytes() == s.read_rows("resid_2").tobytes()
    ds = s.to_xarray_dataset()
    assert ds["resid_2"].values.tobytes() == s.read_rows("resid_2").tobytes()