"""Store reads: which rows a read returns, what it refuses, its dtype, and the one chunk listing."""

import ast
import json
import os

import numpy as np
import pytest
import zarr
from zarr.codecs import BytesCodec, GzipCodec

from activation_store._version import __version__
from activation_store.errors import (
    ChunkCorruptError, ChunkMissingError, ConfigError, RowsNotCommittedError, StoreError, StoreFormatError,
    UnknownLocationError,
)
from activation_store.store import ChunkRef, HookLocation, StoreConfig, open_store
from activation_store.store import activation_store as store_module
from activation_store.store.audit import verify
from activation_store.store import chunk_io
from activation_store.store.chunk_io import ChunkCodec, crc_bytes, crc_matches
from activation_store.store.storage import Storage
from activation_store.store.encoding import physical_dtype
from store_helpers import write_shard

# make_store: chunk_images=4, region_images=8


def _f16(x):
    return x.astype(np.float16).astype(np.float32)


@pytest.fixture
def padded(store_factory):
    """Three committed shards, each followed by region padding: rows [0,10), [16,22), [24,29)."""
    store = store_factory()
    store.plan_shards([("a", 10), ("b", 6), ("c", 5)])
    data = {src: write_shard(store, src, seed, n) for seed, (src, n) in enumerate((("a", 10), ("b", 6), ("c", 5)))}
    return open_store(store.url), data


@pytest.fixture
def adjacent(store_factory):
    """Shard a fills its region exactly, so b's rows follow a's with no padding: rows [0,8), [8,13)."""
    store = store_factory()
    store.plan_shards([("a", 8), ("b", 5)])
    data = {"a": write_shard(store, "a", 1, 8), "b": write_shard(store, "b", 2, 5)}
    return open_store(store.url), data


def test_default_reads_return_every_committed_row_skipping_padding(padded):
    s, data = padded
    assert s.row_ranges() == [(0, 10), (16, 22), (24, 29)] and s.capacity == 32
    for loc in s.locations:
        rows = np.concatenate([_f16(data[src][loc]) for src in "abc"])
        np.testing.assert_array_equal(s.read_rows(loc), rows)
        np.testing.assert_array_equal(s.read_rows(loc, tokens=slice(2, 5)), rows[:, 2:5])
        np.testing.assert_array_equal(s.read_cls(loc), rows[:, 0])
        np.testing.assert_array_equal(s.read_cls(loc), rows[:, 0])
        # stop=None with a start: every committed row from there on (a start in padding is a bound)
        np.testing.assert_array_equal(s.read_rows(loc, 5), rows[5:])
        np.testing.assert_array_equal(s.read_cls(loc, 12), rows[10:, 0])
        assert s.read_cls(loc, 29).shape == (0, s.d_model)


def test_a_range_may_span_adjacent_committed_shards(adjacent):
    s, data = adjacent
    assert s.row_ranges() == [(0, 8), (8, 13)]
    for loc in s.locations:
        rows = np.concatenate([_f16(data["a"][loc]), _f16(data["b"][loc])])
        np.testing.assert_array_equal(s.read_rows(loc, 5, 11), rows[5:11])
        np.testing.assert_array_equal(s.read_cls(loc, 5, 11), rows[5:11, 0])
        np.testing.assert_array_equal(s.read_rows(loc, 0, 13), rows)
        np.testing.assert_array_equal(s.read_rows(loc), rows)


def test_ranges_touching_uncommitted_rows_raise_and_name_the_committed_ranges(store_factory, padded):
    s, _ = padded
    for read in (s.read_rows, s.read_cls):
        with pytest.raises(RowsNotCommittedError, match=r"rows \[8, 12\).*committed ranges: \[\(0, 10\), \(16, 22\)"):
            read("resid_2", 8, 12)  # runs into a's padding
        with pytest.raises(RowsNotCommittedError):
            read("resid_2", 0, 29)  # all committed rows, but padding lies between
        with pytest.raises(RowsNotCommittedError):
            read("resid_2", 30, 31)  # pure padding
    with pytest.raises(RowsNotCommittedError, match="chunk 3"):
        s.read_chunk("resid_2", 3)  # rows 12-15: padding only
    assert issubclass(RowsNotCommittedError, StoreError)

    store = store_factory()
    store.plan_shards([("a", 8), ("b", 5)])
    write_shard(store, "a", 1, 8)
    write_shard(store, "b", 2, 5, commit=False)  # adjacent, but not committed
    s2 = open_store(store.url)
    with pytest.raises(RowsNotCommittedError):
        s2.read_rows("resid_2", 6, 10)
    with pytest.raises(RowsNotCommittedError):
        s2.read_chunk("resid_2", 2)
    assert s2.read_rows("resid_5").shape == (8, s2.n_tokens, s2.d_model)


def test_empty_and_invalid_ranges(store_factory, padded):
    s, _ = padded
    assert s.read_rows("resid_2", 4, 4).shape == (0, s.n_tokens, s.d_model)
    assert s.read_rows("resid_2", 4, 4, tokens=slice(0, 3)).shape == (0, 3, s.d_model)
    assert s.read_cls("resid_2", 5, 2).shape == (0, s.d_model)
    with pytest.raises(ConfigError, match=">= 0"):
        s.read_rows("resid_2", -1, 3)
    empty = store_factory()
    assert empty.read_rows("resid_2").shape == (0, empty.n_tokens, empty.d_model)
    assert empty.read_cls("resid_2").dtype == np.float32 and empty.read_cls("resid_2").shape == (0, empty.d_model)
    assert empty.chunk_refs("resid_2") == []


def test_unknown_location_raises_unknown_location_error(padded):
    s, _ = padded
    assert s.check_location(HookLocation(5)) == "resid_5"
    calls = [
        lambda: s.read_rows("resid_9", 0, 1), lambda: s.read_rows("resid_9"), lambda: s.read_cls("resid_9"),
        lambda: s.read_chunk("resid_9", 0), lambda: s.chunk_refs("resid_9"),
        lambda: s.chunk_refs("resid_9", cls=True), lambda: s.stats("resid_9"), lambda: s.array("resid_9"),
        lambda: s.check_location("resid_9"),
    ]
    for call in calls:
        with pytest.raises(UnknownLocationError, match="has no location 'resid_9'; it has resid_2, resid_5") as e:
            call()
        assert not str(e.value).startswith("'")  # KeyError would quote the message


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_every_read_is_float32_by_default_and_storage_dtype_when_raw(store_factory, dtype):
    store = store_factory(dtype=dtype)
    store.plan_shards([("a", 6)])
    write_shard(store, "a", 1, 6)
    s = open_store(store.url)
    reads = {
        "read_chunk": lambda **kw: s.read_chunk("resid_2", 0, **kw),
        "read_rows": lambda **kw: s.read_rows("resid_2", **kw),
        "read_rows range": lambda **kw: s.read_rows("resid_2", 1, 3, **kw),
        "read_cls": lambda **kw: s.read_cls("resid_2", **kw),
    }
    for name, read in reads.items():
        assert read().dtype == np.float32, name
        raw = read(raw=True)
        assert raw.dtype == physical_dtype(dtype), name
    np.testing.assert_array_equal(s.read_chunk("resid_2", 1), s.read_rows("resid_2", 4, 6))


def test_chunk_refs_lists_main_and_cls_chunks_of_committed_shards(padded, store_factory):
    s, data = padded
    main = s.chunk_refs("resid_2")
    assert [(r.index, r.row_start, r.row_stop, r.shard) for r in main] == [
        (0, 0, 4, 0), (1, 4, 8, 0), (2, 8, 10, 0), (4, 16, 20, 1), (5, 20, 22, 1), (6, 24, 28, 2), (7, 28, 29, 2),
    ]
    assert {(r.array_key, r.rows_per_chunk) for r in main} == {("resid_2", 4)}
    assert main[2].n_rows == 2
    cls = s.chunk_refs("resid_5", cls=True)
    assert [(r.index, r.row_start, r.n_rows, r.shard) for r in cls] == [(0, 0, 8, 0), (1, 8, 2, 0), (2, 16, 6, 1), (3, 24, 5, 2)]
    assert {(r.array_key, r.rows_per_chunk) for r in cls} == {("cls/resid_5", 8)}
    assert [r.index for r in s.chunk_refs("resid_2", shards=[1])] == [4, 5]
    assert [r.index for r in s.chunk_refs("resid_2", cls=True, shards={0, 2})] == [0, 1, 3]
    assert s.chunk_refs("resid_2", shards=[]) == []
    assert isinstance(main[0], ChunkRef)

    # each ref reads back its shard's rows through fetch_chunk_into (as the readers use them)
    for loc, is_cls, tail in (("resid_2", False, (s.n_tokens, s.d_model)), ("resid_5", True, (s.d_model,))):
        rows = np.concatenate([_f16(data[src][loc]) for src in "abc"])
        got = []
        for r in s.chunk_refs(loc, cls=is_cls):
            buf = np.empty((r.rows_per_chunk, *tail), dtype=physical_dtype(s.dtype))
            s.fetch_chunk_into(r.array_key, r.index, buf)
            got.append(buf[r.row_start - r.index * r.rows_per_chunk:][:r.n_rows])
        np.testing.assert_array_equal(np.concatenate(got).astype(np.float32), rows[:, 0] if is_cls else rows)

    # shards that are not committed are not listed
    store = store_factory()
    store.plan_shards([("a", 5), ("b", 5)])
    write_shard(store, "a", 1, 5, commit=False)
    write_shard(store, "b", 2, 5)
    s2 = open_store(store.url)
    assert [(r.index, r.shard) for r in s2.chunk_refs("resid_2")] == [(2, 1), (3, 1)]
    assert s2.chunk_refs("resid_2", shards=[0]) == []


def test_a_store_written_with_config_extra_still_opens(store_factory):
    store = store_factory()
    assert "extra" not in store.attrs["config"] and not hasattr(StoreConfig(), "extra")
    store.plan_shards([("a", 3)])
    data = write_shard(store, "a", 1, 3)
    path = os.path.join(store.url, "zarr.json")
    meta = json.load(open(path))
    meta["attributes"]["activation_store"]["config"]["extra"] = {"note": "written by 0.1"}
    json.dump(meta, open(path, "w"))
    s = open_store(store.url)
    assert s.config == store.config
    np.testing.assert_array_equal(s.read_rows("resid_2"), _f16(data["resid_2"]))


def test_a_damaged_root_config_is_a_format_error(store_factory):
    store = store_factory()
    path = os.path.join(store.url, "zarr.json")
    meta = json.load(open(path))
    meta["attributes"]["activation_store"]["config"]["chunk_images"] = 0
    json.dump(meta, open(path, "w"))
    with pytest.raises(StoreFormatError, match="root attributes"):
        open_store(store.url)


def test_foreign_codec_chains_go_through_zarr(store_factory):
    with pytest.raises(StoreFormatError, match="not an activation-store codec chain"):
        ChunkCodec([{"name": "bytes"}, {"name": "gzip", "configuration": {"level": 5}}])
    with pytest.raises(StoreFormatError, match="unsupported compressor"):
        ChunkCodec([{"name": "bytes"}, {"name": "gzip", "configuration": {"level": 5}}, {"name": "crc32c"}])
    with pytest.raises(StoreFormatError, match="configuration"):
        ChunkCodec([{"name": "bytes"}, {"name": "zstd", "configuration": {}}, {"name": "crc32c"}])
    store = store_factory()
    g = zarr.open_group(store.url, mode="r+")
    arr = g.create_array("foreign", shape=(8, 3), chunks=(4, 3), dtype="float16",
                         serializer=BytesCodec(), compressors=[GzipCodec()])
    arr[...] = np.arange(24, dtype=np.float16).reshape(8, 3)
    s = open_store(store.url)
    assert s.chunk_codec("foreign") is None and s.chunk_codec("resid_2") is not None
    out = np.empty((4, 3), np.float16)
    s.fetch_chunk_into("foreign", 1, out)
    np.testing.assert_array_equal(out, np.arange(12, 24, dtype=np.float16).reshape(4, 3))


def test_one_crc_check_and_corrupt_payloads_are_chunk_corrupt_errors():
    payload = np.arange(48, dtype=np.uint8)
    crc = crc_bytes(payload)
    assert len(crc) == 4 and crc_matches(payload, crc) and crc_matches(memoryview(payload.tobytes()), crc)
    assert not crc_matches(payload[1:], crc) and not crc_matches(payload, crc[:3])
    codec = ChunkCodec([{"name": "bytes"}, {"name": "crc32c"}])
    out = np.empty((4, 4), np.float16)  # 32 bytes: a 48-byte payload with a valid checksum is not this chunk
    with pytest.raises(ChunkCorruptError, match="does not decode"):
        codec.decode_into(payload.tobytes() + crc, out, "chunk x")
    with pytest.raises(ChunkCorruptError, match="checksum"):
        codec.decode_into(payload.tobytes() + b"\0\0\0\0", out, "chunk x")
    good = np.arange(16, dtype=np.float16).reshape(4, 4)
    codec.decode_into(b"".join(bytes(p) for p in codec.encode(good)), out, "chunk x")
    np.testing.assert_array_equal(out, good)


@pytest.mark.parametrize("chain", [[{"name": "bytes"}, {"name": "crc32c"}],
                                   [{"name": "bytes"}, {"name": "zstd", "configuration": {"level": 1}}, {"name": "crc32c"}]])
@pytest.mark.parametrize("short_writes", [False, True])
def test_chunks_checksummed_piece_by_piece_as_written_and_read_are_the_format_s_objects(tmp_path, monkeypatch, chain,
                                                                                  short_writes):
    # local chunks are checksummed a piece at a time as each piece is written, and as each is read
    # (pread, or copied out of a GET's buffer): the file must be byte for byte payload +
    # crc32c(payload), over piece boundaries and short writes alike, and read back to the same
    # values, while a flipped bit in any piece fails the checksum
    monkeypatch.setattr(chunk_io, "PIECE", 1000)
    if short_writes:
        pwrite = os.pwrite
        monkeypatch.setattr(chunk_io.os, "pwrite", lambda fd, data, off: pwrite(fd, memoryview(data)[:333], off))
    codec = ChunkCodec(chain)
    storage = Storage(str(tmp_path / "s"))
    rng = np.random.default_rng(0)
    for i, n in enumerate([1, 500, 1000, 3000, 5003]):  # under, at and over piece multiples (in bytes x2)
        chunk = rng.standard_normal((n, 1)).astype(np.float16)
        storage.write_chunk(f"a/c/{i}", codec.framed(chunk))
        data = (tmp_path / "s" / "a" / "c" / str(i)).read_bytes()
        assert data == b"".join(bytes(memoryview(p).cast("B")) for p in codec.encode(chunk))
        out = np.empty_like(chunk)
        codec.decode_into(data, out, "chunk")
        np.testing.assert_array_equal(out, chunk)
        path = str(tmp_path / "s" / "a" / "c" / str(i))
        if codec.uncompressed:  # read back a piece at a time, each piece checksummed as it lands
            out = np.empty_like(chunk)
            codec.pread_uncompressed(path, out, "chunk")
            np.testing.assert_array_equal(out, chunk)
        # one flipped bit anywhere, the last piece included, is a checksum failure on every path
        for pos in sorted({0, len(data) // 2, len(data) - 5}):
            bad = bytearray(data)
            bad[pos] ^= 0x10
            with pytest.raises(ChunkCorruptError, match="checksum"):
                codec.decode_into(bytes(bad), np.empty_like(chunk), "chunk")
            if codec.uncompressed:
                (tmp_path / "bad").write_bytes(bytes(bad))
                with pytest.raises(ChunkCorruptError, match="checksum"):
                    codec.pread_uncompressed(str(tmp_path / "bad"), np.empty_like(chunk), "chunk")


def test_verify_uses_the_same_crc_check(padded):
    s, _ = padded
    assert verify(s, progress=False) == []


def test_the_store_module_does_not_import_the_package_init():
    tree = ast.parse(open(store_module.__file__).read())
    top = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "activation_store"]
    assert top == []
    assert store_module.__version__ == __version__


# ---------------------------------------------------------------------------- damaged metadata
@pytest.fixture
def committed(store_factory):
    store = store_factory()
    store.plan_shards([("a", 6), ("b", 5)])
    write_shard(store, "a", 1, 6)
    write_shard(store, "b", 2, 5)
    return store.url


def _reads(url):
    """What a reader does: open, list the shards, read rows, statistics and the image table."""
    s = open_store(url)
    s.read_rows("resid_2")
    s.read_cls("resid_5")
    s.stats("resid_2")
    s.images()


@pytest.mark.parametrize("damage,error,names", [
    ("shard-json", StoreFormatError, r"shards/s000001/zarr.json \(the metadata of shard s000001.*not valid JSON"),
    ("shard-record", StoreFormatError, r"shards/s000001/zarr.json has no valid 'activation_store_shard'"),
    ("shard-missing", StoreFormatError, r"shards/s000001/zarr.json \(the record of shard s000001.*is missing, but"),
    ("array-missing", StoreFormatError, r"resid_2/zarr.json \(the metadata of array resid_2\) is missing"),
    ("array-json", StoreFormatError, r"resid_2/zarr.json \(the metadata of array resid_2\) is damaged"),
    ("cls-array-json", StoreFormatError, r"cls/resid_5/zarr.json \(the metadata of array cls/resid_5\) is damaged"),
    ("moments-chunk", ChunkCorruptError, r"shards/s000000/moments/c/0/0/0/0 \(the statistics of resid_2 of shard s000000\).*checksum"),
    ("moments-chunk-missing", ChunkMissingError, r"shards/s000001/moments/c/0/0/0/0 .*is missing"),
    ("moments-json", StoreFormatError, r"shards/s000000/moments/zarr.json \(the metadata of the statistics of shard s000000\)"),
])
def test_damaged_metadata_and_statistics_give_one_error_naming_the_object(committed, damage, error, names):
    url = committed
    _reads(url)
    path = {
        "shard-json": "shards/s000001/zarr.json", "shard-record": "shards/s000001/zarr.json",
        "shard-missing": "shards/s000001/zarr.json", "array-missing": "resid_2/zarr.json",
        "array-json": "resid_2/zarr.json", "cls-array-json": "cls/resid_5/zarr.json",
        "moments-chunk": "shards/s000000/moments/c/0/0/0/0", "moments-chunk-missing": "shards/s000001/moments/c/0/0/0/0",
        "moments-json": "shards/s000000/moments/zarr.json",
    }[damage]
    full = os.path.join(url, path)
    if damage.endswith("missing"):
        os.remove(full)
    elif damage == "shard-record":
        doc = json.load(open(full))
        del doc["attributes"]["activation_store_shard"]["row_start"]
        json.dump(doc, open(full, "w"))
    elif damage == "moments-chunk":
        data = bytearray(open(full, "rb").read())
        data[10] ^= 0x40
        open(full, "wb").write(bytes(data))
    else:
        data = open(full, "rb").read()
        open(full, "wb").write(data[: len(data) // 2])  # cut short, as a crash of a non-atomic writer would
    with pytest.raises(error, match=names) as e:
        _reads(url)
    assert "\n" not in str(e.value)
