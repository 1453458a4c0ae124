"""`verify` on damaged stores: every object of a committed shard and of the store's layout that is
missing, changed or unaccounted for is a problem naming it; an interrupted writer's leftovers are
work for the next harvest run, not a problem; and no damage makes verify itself fail."""

import json
import os
import shutil

import pytest
from crc32c import crc32c

from activation_store.cli import main
from activation_store.store import open_store
from activation_store.store.audit import Pending, format_verify, verify
from activation_store.store.images import from_parquet_bytes
from store_helpers import write_shard


def _problems(url):
    return verify(open_store(url), progress=False)


def _wheres(report):
    return {p.where for p in report}


def _shard_doc_path(url, index):
    return os.path.join(url, "shards", f"s{index:06d}", "zarr.json")


def _update_commit(url, index, **fields):
    """Edit a shard's commit record in place (what a format 1.1 writer records, for example)."""
    path = _shard_doc_path(url, index)
    with open(path) as f:
        doc = json.load(f)
    commit = doc["attributes"]["activation_store_shard"]["commit"]
    for k, v in fields.items():
        if v is None:
            commit.pop(k, None)
        else:
            commit[k] = v
    with open(path, "w") as f:
        json.dump(doc, f)


def _record_images_crc(url, index):
    """The commit record's images_crc32c (format 1.1), set here whether or not the writer sets it."""
    with open(os.path.join(url, "shards", f"s{index:06d}", "images.parquet"), "rb") as f:
        _update_commit(url, index, images_crc32c=crc32c(f.read()))


@pytest.fixture
def two_shards(store_factory):
    """Committed shards a (10 images: rows 0-9, region 0-15) and b (6 images: rows 16-21, region
    16-23), and a planned shard c (region 24-31). Main chunks hold 4 rows, CLS chunks 8."""
    store = store_factory()
    store.plan_shards([("a", 10), ("b", 6), ("c", 3)])
    write_shard(store, "a", 0, 10)
    write_shard(store, "b", 1, 6)
    assert _problems(store.url) == []
    return store.url


# ---------------------------------------------------------------------------- 1. statistics
def test_a_missing_statistics_chunk_is_a_problem_naming_shard_and_location(two_shards, capsys):
    key = "shards/s000001/moments/c/1/0/0/0"  # location 1 (resid_5) of shard s000001
    assert os.path.exists(os.path.join(two_shards, key))
    os.remove(os.path.join(two_shards, key))
    report = _problems(two_shards)
    assert _wheres(report) == {key}
    (p,) = report
    assert "resid_5" in p.what and "s000001" in p.what and "(b)" in p.what and "zeros" in p.what
    assert main(["verify", two_shards, "--quiet"]) == 1
    assert key in capsys.readouterr().out


def test_a_changed_statistics_chunk_fails_its_checksum(two_shards):
    path = os.path.join(two_shards, "shards/s000000/moments/c/0/0/0/0")
    with open(path, "r+b") as f:
        f.seek(20)
        b = f.read(1)
        f.seek(20)
        f.write(bytes([b[0] ^ 1]))
    report = _problems(two_shards)
    assert _wheres(report) == {"shards/s000000/moments/c/0/0/0/0"}
    assert "checksum" in report[0].what


def test_statistics_metadata_of_the_wrong_shape_is_a_problem(two_shards):
    path = os.path.join(two_shards, "shards/s000000/moments/zarr.json")
    with open(path) as f:
        doc = json.load(f)
    doc["shape"][0] = 1  # one location's statistics only: resid_5's would never be read
    with open(path, "w") as f:
        json.dump(doc, f)
    assert _wheres(_problems(two_shards)) == {"shards/s000000/moments/zarr.json"}


# ---------------------------------------------------------------------------- 2. lost shard groups
def test_a_lost_shard_group_makes_its_chunks_orphans_and_is_named(two_shards, capsys):
    os.remove(_shard_doc_path(two_shards, 1))
    report = _problems(two_shards)
    by_where = {p.where: p.what for p in report}
    # the folder that lost its metadata
    assert "holds" in by_where["shards/s000001/zarr.json"] and "no readable group metadata" in by_where["shards/s000001/zarr.json"]
    # its region is in no shard's region now
    assert "rows 16-23" in by_where["shards"] and "no planned shard's region" in by_where["shards"]
    # and its chunks, per array, with their rows
    for array in ("resid_2", "resid_5"):
        assert "orphaned" in by_where[f"{array}/c/4..5"] and "rows 16-23" in by_where[f"{array}/c/4..5"]
    for array in ("cls/resid_2", "cls/resid_5"):
        assert "orphaned" in by_where[f"{array}/c/2/0"] and "rows 16-23" in by_where[f"{array}/c/2/0"]
    assert len(report) == 6
    assert main(["verify", two_shards, "--quiet"]) == 1
    assert "orphaned" in capsys.readouterr().out


def test_a_lost_group_of_a_planned_shard_is_found_from_the_array_rows(two_shards):
    os.remove(_shard_doc_path(two_shards, 2))  # the last shard: nothing but its zarr.json
    os.rmdir(os.path.dirname(_shard_doc_path(two_shards, 2)))
    report = _problems(two_shards)
    assert _wheres(report) == {"shards"}
    assert "rows 24-31" in report[0].what


def test_a_missing_shard_index_is_named(store_factory):
    store = store_factory()
    store.plan_shards([("a", 3), ("b", 3), ("c", 3)])
    write_shard(store, "c", 0, 3)
    shutil.rmtree(os.path.dirname(_shard_doc_path(store.url, 1)))  # planned, so it held only its zarr.json
    report = _problems(store.url)
    assert _wheres(report) == {"shards/s000001/zarr.json", "shards"}
    assert "rows 8-15" in next(p.what for p in report if p.where == "shards")


def test_chunks_no_commit_accounts_for_are_problems(two_shards):
    chunk = os.path.join(two_shards, "resid_2", "c", "0", "0", "0")
    for index in (3, 6, 9):  # beyond a's 10 committed rows; in planned c's region; beyond every region
        os.makedirs(os.path.join(two_shards, "resid_2", "c", str(index), "0"), exist_ok=True)
        shutil.copy(chunk, os.path.join(two_shards, "resid_2", "c", str(index), "0", "0"))
    by_where = {p.where: p.what for p in _problems(two_shards)}
    assert set(by_where) == {"resid_2/c/3/0/0", "resid_2/c/6/0/0", "resid_2/c/9/0/0"}
    assert "unaccounted" in by_where["resid_2/c/3/0/0"] and "beyond its 10 committed rows" in by_where["resid_2/c/3/0/0"]
    assert "unaccounted" in by_where["resid_2/c/6/0/0"] and "planned" in by_where["resid_2/c/6/0/0"]
    assert "orphaned" in by_where["resid_2/c/9/0/0"] and "rows 36-39" in by_where["resid_2/c/9/0/0"]


# ---------------------------------------------------------------------------- 3. images.parquet
def _silent_flip(path) -> bytes:
    """images.parquet with one bit flipped that parquet itself does not notice: the table still
    reads, with the same rows, but other contents."""
    with open(path, "rb") as f:
        data = f.read()
    original = from_parquet_bytes(data)
    for offset in range(len(data)):
        flipped = bytearray(data)
        flipped[offset] ^= 0x10
        try:
            table = from_parquet_bytes(bytes(flipped))
        except Exception:  # noqa: BLE001 - this flip is caught by parquet
            continue
        if table.num_rows == original.num_rows and table["row"].equals(original["row"]) and not table.equals(original):
            return bytes(flipped)
    raise AssertionError("no silent flip found")


def test_images_parquet_is_checked_against_its_commit_checksum(two_shards, capsys):
    _record_images_crc(two_shards, 0)
    assert _problems(two_shards) == []
    path = os.path.join(two_shards, "shards", "s000000", "images.parquet")
    damaged = _silent_flip(path)
    with open(path, "wb") as f:
        f.write(damaged)
    report = _problems(two_shards)
    assert _wheres(report) == {"s000000"}
    assert "images.parquet fails its checksum" in report[0].what
    assert main(["verify", two_shards, "--quiet"]) == 1
    assert "images.parquet" in capsys.readouterr().out


def test_a_format_1_0_commit_without_the_checksum_is_not_questioned(two_shards):
    _update_commit(two_shards, 0, images_crc32c=None)  # whatever the writer records: a 1.0 commit
    path = os.path.join(two_shards, "shards", "s000000", "images.parquet")
    damaged = _silent_flip(path)
    with open(path, "wb") as f:
        f.write(damaged)
    assert _problems(two_shards) == []  # nothing to check it against, and nothing said about it


# ---------------------------------------------------------------------------- 4. metadata objects
METADATA = ["resid_2/zarr.json", "cls/resid_2/zarr.json", "resid_5/zarr.json", "cls/resid_5/zarr.json",
            "cls/zarr.json", "shards/zarr.json", "shards/s000000/zarr.json", "shards/s000002/zarr.json",
            "shards/s000001/moments/zarr.json"]
DAMAGE = {
    "deleted": None,
    "truncated": "half",
    "not utf-8": b"\xff\xfe\x00garbage",
    "not metadata": b'{"zarr_format": 3, "node_type": "array"}',
    "a list": b"[1, 2, 3]",
}


def _damage(path, how):
    if how is None:
        os.remove(path)
        return
    if how == "half":
        with open(path, "rb") as f:
            how = f.read()
        how = how[: len(how) // 2]
    with open(path, "wb") as f:
        f.write(how)


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("key", METADATA)
def test_damaged_metadata_is_a_problem_naming_it(two_shards, capsys, key, damage):
    _damage(os.path.join(two_shards, key), DAMAGE[damage])
    assert main(["verify", two_shards, "--quiet", "--json"]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    report = json.loads(captured.out)
    if key == "shards/s000002/zarr.json" and damage == "deleted":
        # planned, so nothing else of it is left: only the rows of its region say it is lost
        assert report["problems"] == [{"where": "shards", "what": (
            "unaccounted: rows 24-31 of the arrays lie in no planned shard's region; no shard group accounts for "
            "them (was shards/s000002/zarr.json, or a later one, lost?)")}]
    else:
        assert key in {p["where"] for p in report["problems"]}, report


def test_damaged_root_metadata_is_named_and_the_cli_says_so_in_one_line(two_shards, capsys):
    store = open_store(two_shards)  # opened before the damage
    os.remove(os.path.join(two_shards, "zarr.json"))
    assert "zarr.json" in _wheres(verify(store, progress=False))
    assert main(["verify", two_shards]) == 2  # the CLI cannot open it as a store at all
    err = capsys.readouterr().err
    assert "no zarr.json" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_verify_survives_any_single_damage_and_reports_it(store_factory, tmp_path):
    """Delete or truncate each object of a store in turn: verify always returns, with a problem for
    every object except those of the interrupted shard (pending work, not a problem)."""
    store = store_factory(codec="zstd")
    store.plan_shards([("a", 10), ("b", 6), ("c", 5), ("d", 2)])
    write_shard(store, "a", 0, 10, dropped=1)
    write_shard(store, "b", 1, 6)
    write_shard(store, "c", 2, 5, commit=False)  # interrupted: state writing, chunks 6 (rows 24-27)
    _record_images_crc(store.url, 1)
    base = store.url
    keys = sorted(os.path.relpath(os.path.join(d, f), base) for d, _, fs in os.walk(base) for f in fs)
    assert _problems(base) == []
    pending_only = {k for k in keys if k.startswith(("resid_2/c/6/", "resid_5/c/6/"))}
    assert len(pending_only) == 2
    for key in keys:
        for how in (None, "half"):
            copy = str(tmp_path / "copy")
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(base, copy)
            s = open_store(copy)
            _damage(os.path.join(copy, key), how)
            report = verify(s, progress=False)
            if key in pending_only:
                assert report == [] and [p.shard for p in report.pending] == ["s000002"], (key, how)
            else:
                assert report, (key, how)


# ---------------------------------------------------------------------------- 5. interrupted writers
def test_an_interrupted_shard_is_pending_work_not_a_problem(store_factory, capsys):
    store = store_factory()
    store.plan_shards([("a", 10), ("b", 6)])
    write_shard(store, "a", 0, 10)
    write_shard(store, "b", 1, 6, commit=False)  # the writer died: state writing
    torn = os.path.join(store.url, "resid_5", "c", "4", "0", "0")  # rows 16-19 of b, half written
    with open(torn, "r+b") as f:
        f.truncate(os.path.getsize(torn) // 2)
    report = _problems(store.url)
    assert report == [] and not report
    # b's first main chunk, of both locations; the rest was still in the writer's buffers
    assert report.pending == [Pending("s000001", "b", 2)]
    assert str(report.pending[0]) == (
        "shard s000001 (b) is being written or was interrupted: 2 chunks will be rewritten by the next harvest run")
    text = format_verify(store.url, report)
    assert "OK (1 committed shards, 10 images" in text and "shard s000001 (b) is being written" in text
    assert report.to_json() == {"ok": True, "problems": [],
                                "pending": [{"where": "s000001", "what": report.pending[0].what}]}
    assert main(["verify", store.url, "--quiet"]) == 0
    assert "OK" in capsys.readouterr().out

    write_shard(open_store(store.url), "b", 1, 6)  # the next run rewrites it
    report = _problems(store.url)
    assert report == [] and report.pending == []


def test_a_torn_chunk_of_a_committed_shard_stays_a_problem(store_factory):
    store = store_factory()
    store.plan_shards([("a", 10), ("b", 6)])
    write_shard(store, "a", 0, 10)
    write_shard(store, "b", 1, 6, commit=False)
    path = os.path.join(store.url, "resid_5", "c", "1", "0", "0")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    report = _problems(store.url)
    assert [p.where.split(" ")[0] for p in report] == ["resid_5/c/1/0/0"]
    assert "1 problem(s)" in format_verify(store.url, report)
    assert len(report.pending) == 1


# ---------------------------------------------------------------------------- the same on S3
def test_verify_on_s3_finds_lost_objects_and_pending_work(s3):
    import boto3

    from store_helpers import make_store

    opts = {"endpoint_url": s3}
    url = "s3://acts/faults/store.zarr"
    store = make_store(url, storage_options=opts)
    store.plan_shards([("a", 10), ("b", 6), ("c", 3)])
    write_shard(store, "a", 0, 10)
    write_shard(store, "b", 1, 6, commit=False)
    report = verify(open_store(url, opts), progress=False)
    assert report == [] and report.pending == [Pending("s000001", "b", 2)]
    client = boto3.client("s3", endpoint_url=s3)
    for key in ("shards/s000000/zarr.json", "shards/s000000/moments/c/0/0/0/0", "cls/resid_5/zarr.json"):
        client.delete_object(Bucket="acts", Key=f"faults/store.zarr/{key}")
    wheres = _wheres(verify(open_store(url, opts), progress=False))
    assert {"shards/s000000/zarr.json", "cls/resid_5/zarr.json", "resid_2/c/0..2", "cls/resid_2/c/0..1", "shards"} <= wheres
