"""Format v1 round trips: what goes in comes out, through our API and through plain zarr."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr
from crc32c import crc32c

from activation_store.errors import (
    CapacityError, ChunkCorruptError, ConfigError, NonFiniteActivationError, RowsNotCommittedError, ShardStateError,
    StoreExistsError, StoreFormatError, StoreNotEmptyError, StoreNotFoundError, StoreVersionError,
    UnknownLocationError,
)
from activation_store.store import ImageRecord, open_store
from activation_store.store.encoding import LOSSLESS_PRESETS, to_float32, to_storage
from activation_store.store.images import decode_name, decode_text
from store_helpers import make_store, records, shard_data, write_shard


def representable(x, dtype):
    """Values that the storage dtype holds exactly, so a lossless round trip must be bit-exact."""
    return to_float32(to_storage(x, dtype), dtype)


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("codec", LOSSLESS_PRESETS)
def test_lossless_round_trip_is_exact(store_factory, dtype, codec):
    store = store_factory(dtype=dtype, codec=codec)
    store.plan_shards([("a", 10), ("b", 6)])
    written = {}
    for src, seed, n in (("a", 1, 10), ("b", 2, 6)):
        data = {k: representable(v, dtype) for k, v in shard_data(store, seed, n).items()}
        with store.writer(src) as w:
            w.add(data, records(src, n))
        written[src] = data
    s = open_store(store.url)
    assert s.n_images == 16
    (a0, a1), (b0, b1) = s.row_ranges()
    for loc in s.locations:
        np.testing.assert_array_equal(s.read_rows(loc, a0, a1), written["a"][loc])
        np.testing.assert_array_equal(s.read_rows(loc, b0, b1), written["b"][loc])
        expected_cls = np.concatenate([written["a"][loc][:, 0], written["b"][loc][:, 0]])
        np.testing.assert_array_equal(s.read_cls(loc), expected_cls)
        # a token range, and chunk by chunk
        np.testing.assert_array_equal(s.read_rows(loc, a0 + 2, a0 + 7, tokens=slice(3, 9)), written["a"][loc][2:7, 3:9])
        chunks = [s.read_chunk(loc, c.index) for c in s.chunk_refs(loc)]
        np.testing.assert_array_equal(np.concatenate(chunks), np.concatenate([written["a"][loc], written["b"][loc]]))


@pytest.mark.parametrize("dtype,keepbits", [("fp16", 7), ("fp16", 4), ("bf16", 5)])
def test_lossy_preset_stays_within_its_recorded_bound(store_factory, dtype, keepbits):
    store = store_factory(dtype=dtype, codec="bitround-shuffle-zstd", keepbits=keepbits)
    store.plan_shards([("a", 12)])
    data = {k: representable(v, dtype) for k, v in shard_data(store, 3, 12).items()}
    with store.writer("a") as w:
        w.add(data, records("a", 12))
    s = open_store(store.url)
    bound = s.attrs["codec"]["error_bound"]
    assert bound["relative"] == 2.0 ** -(keepbits + 1)
    for loc in s.locations:
        got = s.read_rows(loc, 0, 12)
        err = np.abs(got - data[loc])
        assert (err <= bound["relative"] * np.abs(data[loc]) + bound["absolute"]).all()
        assert err.max() > 0  # it is lossy
        recorded = s.lossy_error(loc)
        assert recorded["max_abs"] == pytest.approx(err.max())
        normal = np.abs(data[loc]) >= np.finfo(np.float16).tiny
        assert recorded["max_rel"] == pytest.approx((err[normal] / np.abs(data[loc][normal])).max())
        assert recorded["max_rel"] <= bound["relative"]


def test_plain_zarr_reads_the_store_without_project_code(store_factory, tmp_path):
    store = store_factory(dtype="fp16", codec="shuffle-zstd")
    store.plan_shards([("a", 7)])
    data = write_shard(store, "a", seed=5, n=7)
    out = tmp_path / "plain.npz"
    code = f"""
import json, sys, numpy as np, zarr
assert 'activation_store' not in sys.modules
g = zarr.open_group({store.url!r}, mode="r")
meta = g.attrs["activation_store"]
shard = zarr.open_group({store.url!r}, path="shards/s000000", mode="r").attrs["activation_store_shard"]
n = shard["commit"]["n_rows"]
np.savez({str(out)!r}, **{{loc: g[loc][:n] for loc in meta["locations"]}}, cls=g["cls/resid_2"][:n])
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    got = np.load(out)
    for loc in store.locations:
        np.testing.assert_array_equal(got[loc], data[loc].astype(np.float16))
    np.testing.assert_array_equal(got["cls"], data["resid_2"][:, 0].astype(np.float16))


def test_root_attributes_describe_the_store(store_factory):
    store = store_factory(dtype="bf16", codec="zstd")
    g = zarr.open_group(store.url, mode="r")
    a = g.attrs["activation_store"]
    assert a["format_version"] == "1.1"
    assert a["locations"] == ["resid_2", "resid_5"] and a["n_tokens"] == 17 and a["d_model"] == 32
    assert a["dtype"] == "bf16" and a["physical_dtype"] == "uint16"
    assert [c["name"] for c in a["codec_chain"]] == ["bytes", "zstd", "crc32c"]
    assert a["model"]["name"] == "test" and a["software_version"]
    arr = g["resid_2"]
    assert arr.attrs["activation_store"]["logical_dtype"] == "bf16"
    assert arr.chunks == (4, 17, 32)  # chunked along images only


def test_statistics_match_the_concatenated_data(store_factory):
    store = store_factory()
    store.plan_shards([("a", 9), ("b", 5)])
    a = write_shard(store, "a", 1, 9)
    b = write_shard(store, "b", 2, 5)
    s = open_store(store.url)
    for loc in s.locations:
        x = np.concatenate([a[loc], b[loc]]).astype(np.float16).astype(np.float64)
        for tokens, sel in (("all", x.reshape(-1, 32)), ("cls", x[:, 0]), ("patches", x[:, 1:].reshape(-1, 32))):
            m = s.stats(loc, tokens)
            assert m.count == len(sel)
            np.testing.assert_allclose(m.mean, sel.mean(0), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(m.var, sel.var(0), rtol=1e-10)
            np.testing.assert_allclose(m.mean_sq_norm, (sel**2).sum(1).mean(), rtol=1e-10)
            assert m.max_abs == np.abs(sel).max()


def test_uncommitted_shards_are_invisible_and_appends_work(store_factory):
    store = store_factory()
    store.plan_shards([("a", 5), ("b", 5)])
    write_shard(store, "a", 1, 5)
    write_shard(store, "b", 2, 5, commit=False)
    s = open_store(store.url)
    assert s.n_images == 5 and s.row_ranges() == [(0, 5)]
    assert [x.state for x in s.shards()] == ["committed", "writing"]
    with pytest.raises(RowsNotCommittedError):
        s.read_rows("resid_2", 8, 10)  # rows of shard b are not committed
    # append a shard later: it gets a new region after the others
    (c,) = s.plan_shards([("c", 20)])
    assert c.row_start == 16 and c.region_rows == 24
    write_shard(s, "c", 3, 20)
    s2 = open_store(store.url)
    assert s2.n_images == 25 and s2.capacity == 40
    # planning again is idempotent
    assert s2.plan_shards([("a", 5)])[0].row_start == 0


def test_images_table_traces_every_row_and_every_dropped_image(store_factory):
    store = store_factory()
    store.plan_shards([("a", 6)])
    write_shard(store, "a", 1, 6, dropped=2)
    s = open_store(store.url)
    t = s.images()
    assert t.num_rows == 6 and sorted(t["row"].to_pylist()) == list(range(6))
    assert t["key"].to_pylist()[0] == "a/00000" and t["source_shard"].to_pylist()[0] == "a"
    full = s.images(include_dropped=True)
    dropped = full.filter(full["row"].to_numpy() < 0)
    assert dropped["status"].to_pylist() == ["decode_error"] * 2
    assert s.shards()[0].commit["by_status"] == {"ok": 6, "decode_error": 2}


def test_writer_errors_are_ours_and_clear(store_factory):
    store = store_factory()
    store.plan_shards([("a", 4)])
    data = shard_data(store, 1, 5)
    w = store.writer("a")
    with pytest.raises(CapacityError, match="planned for 4"):
        w.add(data, records("a", 5))
    with pytest.raises(ConfigError, match="shape"):
        w.add({k: v[:, :3] for k, v in data.items()}, records("a", 5))
    with pytest.raises(ConfigError, match="missing"):
        w.add({"resid_2": data["resid_2"][:2]}, records("a", 2))
    bad = {k: v[:2].copy() for k, v in data.items()}
    bad["resid_5"][1, 3, 4] = 1e6  # overflows fp16
    with pytest.raises(NonFiniteActivationError, match="a/00001"):
        w.add(bad, records("a", 2))
    w.add({k: v[:4] for k, v in data.items()}, records("a", 4))
    w.commit()
    with pytest.raises(ShardStateError, match="already committed"):
        store.writer("a")
    with pytest.raises(ShardStateError, match="cannot grow"):
        store.plan_shards([("a", 9)])
    with pytest.raises(UnknownLocationError, match="no location"):
        store.read_rows("resid_9", 0, 1)
    store.plan_shards([("b", 2)])
    with pytest.raises(ConfigError, match="status"):
        store.writer("b").add({k: v[:1] for k, v in data.items()}, [ImageRecord("x", status="corrupt")])


def test_opening_errors(store_factory, tmp_path):
    with pytest.raises(StoreNotFoundError, match="no activation store"):
        open_store(str(tmp_path / "nowhere"))
    zarr.open_group(str(tmp_path / "plain"), mode="w")
    with pytest.raises(StoreFormatError, match="not an activation store"):
        open_store(str(tmp_path / "plain"))
    store = store_factory()
    with pytest.raises(StoreExistsError):
        type(store).create(store.url, locations="2", n_tokens=3, d_model=4)
    meta_path = f"{store.url}/zarr.json"
    meta = json.load(open(meta_path))
    meta["attributes"]["activation_store"]["format_version"] = "3.0"
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(StoreVersionError, match=r"format 3\.0.*reads format 1\.x and 2\.x"):
        open_store(store.url)


def test_create_refuses_a_directory_that_is_not_empty_and_deletes_nothing(tmp_path):
    home = tmp_path / "home"
    (home / "Documents").mkdir(parents=True)
    (home / "notes.txt").write_text("mine")
    (home / "Documents" / "thesis.tex").write_text("mine too")
    with pytest.raises(StoreNotEmptyError, match=r"is not empty and is not an activation store.*'Documents', 'notes.txt'"):
        make_store(str(home))
    assert sorted(os.listdir(home)) == ["Documents", "notes.txt"] and (home / "notes.txt").read_text() == "mine"
    assert issubclass(StoreNotEmptyError, StoreExistsError)
    # names a store would use are no excuse: a file it did not write is refused too
    (tmp_path / "look-alike" / "shards").mkdir(parents=True)
    (tmp_path / "look-alike" / "shards" / "data.bin").write_bytes(b"x")
    with pytest.raises(StoreNotEmptyError, match="shards/data.bin"):
        make_store(str(tmp_path / "look-alike"))
    assert os.listdir(tmp_path / "look-alike" / "shards") == ["data.bin"]
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(StoreExistsError, match="is a file"):
        make_store(str(tmp_path / "a-file"))
    # an empty directory is fine
    (tmp_path / "empty").mkdir()
    assert make_store(str(tmp_path / "empty")).locations == ["resid_2", "resid_5"]


def test_names_that_are_not_utf8_are_stored_percent_encoded_and_decode_to_their_bytes(store_factory):
    store = store_factory()
    store.plan_shards([("a", 3)])
    bad = os.fsdecode(b"img\xff.jpg")  # a file name with a byte that is not UTF-8: '\udcff' in Python
    folder = os.fsdecode(b"/data/caf\xe9")
    recs = [ImageRecord(key=bad, url=f"{folder}/{bad}", source_shard=folder, source_row=0),
            ImageRecord(key="100%.jpg", url="http://x/a%20b.jpg", source_shard="a", source_row=1),
            ImageRecord(key="ok.jpg", source_shard="a", source_row=2)]
    gone = os.fsdecode(b"gone\xfe.jpg")
    dropped = ImageRecord(key=gone, source_shard="a", status="decode_error", error=f"cannot decode {gone}")
    with store.writer("a") as w:
        w.add({k: v[:3] for k, v in shard_data(store, 1, 3).items()}, recs)
        w.add_dropped([dropped])
    t = open_store(store.url).images(include_dropped=True).to_pylist()
    assert [r["percent_encoded"] for r in t] == [True, False, False, True]
    assert t[0]["key"] == "img%FF.jpg" and t[0]["source_shard"] == "/data/caf%E9"
    assert decode_name(t[0]["key"]) == b"img\xff.jpg" and decode_text(t[0]["key"]) == bad
    assert decode_name(t[0]["url"]) == b"/data/caf\xe9/img\xff.jpg"
    assert decode_name(t[0]["source_shard"]) == os.fsencode(folder)
    assert t[1]["key"] == "100%.jpg" and t[1]["url"] == "http://x/a%20b.jpg"  # valid names are stored as given
    assert decode_text(t[3]["error"]) == dropped.error and t[3]["status"] == "decode_error"


def test_the_commit_record_checksums_the_image_table_and_reads_check_it(store_factory):
    store = store_factory()
    store.plan_shards([("a", 5)])
    write_shard(store, "a", 1, 5, dropped=1)
    s = open_store(store.url)
    commit = s.shard("a").commit
    path = os.path.join(store.url, "shards", "s000000", "images.parquet")
    data = open(path, "rb").read()
    assert commit["images_crc32c"] == crc32c(data) and commit["moments_chunks"] == 2
    assert s.images().num_rows == 5
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(damaged))
    with pytest.raises(ChunkCorruptError, match=r"shards/s000000/images.parquet \(the image table of shard s000000.*checksum"):
        open_store(store.url).images()
    # a 1.0 commit has no checksum: nothing to check against (the damage then shows as parquet's own error, or not at all)
    meta = os.path.join(store.url, "shards", "s000000", "zarr.json")
    doc = json.load(open(meta))
    del doc["attributes"]["activation_store_shard"]["commit"]["images_crc32c"]
    json.dump(doc, open(meta, "w"))
    open(path, "wb").write(data)
    assert open_store(store.url).images().num_rows == 5
