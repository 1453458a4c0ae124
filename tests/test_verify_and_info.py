"""`actstore verify` finds damage and names it; `actstore info` describes empty, partial and full stores."""

import json
import os

import pytest

from activation_store.cli import main
from activation_store.errors import ChunkCorruptError, ChunkMissingError
from activation_store.store import open_store
from store_helpers import write_shard


def _flip_byte(path, offset=40):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("codec", ["none", "shuffle-zstd"])
def test_verify_names_a_flipped_byte_and_reading_it_raises_our_error(store_factory, capsys, codec):
    store = store_factory(codec=codec)
    store.plan_shards([("a", 10)])
    write_shard(store, "a", 0, 10)
    assert main(["verify", store.url, "--quiet"]) == 0
    assert "OK" in capsys.readouterr().out
    _flip_byte(os.path.join(store.url, "resid_5", "c", "1", "0", "0"))
    assert main(["verify", store.url, "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "resid_5/c/1/0/0 (rows 4-7, shard s000000" in out and "checksum" in out
    assert "resid_2/c/1" not in out
    s = open_store(store.url)
    with pytest.raises(ChunkCorruptError, match=r"resid_5/c/1/0/0"):
        s.read_rows("resid_5", 0, 10)
    s.read_rows("resid_2", 0, 10)  # other chunks still read
    s.read_rows("resid_5", 0, 4)


def test_verify_finds_missing_chunks_and_metadata(store_factory, capsys):
    store = store_factory()
    store.plan_shards([("a", 10), ("b", 3)])
    write_shard(store, "a", 0, 10)
    write_shard(store, "b", 1, 3)
    os.remove(os.path.join(store.url, "resid_2", "c", "2", "0", "0"))
    os.remove(os.path.join(store.url, "shards", "s000001", "images.parquet"))
    assert main(["verify", store.url, "--quiet", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    wheres = {p["where"] for p in report["problems"]}
    assert wheres == {"resid_2/c/2/0/0", "s000001"}
    with pytest.raises(ChunkMissingError, match="resid_2/c/2/0/0"):
        open_store(store.url).read_rows("resid_2", 8, 10)


def test_info_on_empty_partial_and_full_stores(store_factory, capsys):
    store = store_factory(codec="shuffle-zstd")
    assert main(["info", store.url, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["images"] == 0 and d["shards"] == {"total": 0, "planned": 0, "writing": 0, "committed": 0}
    assert d["per_location"]["resid_2"]["bytes_per_value"] is None

    store.plan_shards([("a", 10), ("b", 6), ("c", 3)])
    write_shard(store, "a", 0, 10, dropped=2)
    write_shard(store, "b", 1, 6, commit=False)
    assert main(["info", store.url, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["images"] == 10 and d["tokens"] == 170
    # counted per state: "planned" is the state, not every shard planned so far
    assert d["shards"] == {"total": 3, "planned": 1, "writing": 1, "committed": 1}
    assert d["images_by_status"] == {"ok": 10, "decode_error": 2}
    loc = d["per_location"]["resid_2"]
    assert loc["committed_chunks"] == 3 and loc["pending_chunks"] == 1
    assert 0.5 < loc["bytes_per_value"] < 2.2
    assert loc["stats"]["all"]["count"] == 170 and loc["stats"]["cls"]["count"] == 10

    assert main(["info", store.url]) == 0
    assert "3 input shards: 1 planned, 1 writing, 1 committed" in capsys.readouterr().out

    write_shard(open_store(store.url), "b", 1, 6)
    assert main(["info", store.url]) == 0
    text = capsys.readouterr().out
    assert "16 committed" in text and "3 input shards: 1 planned, 0 writing, 2 committed" in text and "shuffle-zstd" in text
    assert "resid_5" in text and "B/value" in text


def test_cli_help_explains_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("info", "verify"):
        assert cmd in out
    assert main(["verify", "--help"]) == 0
    assert "checksum" in capsys.readouterr().out


def test_cli_reports_a_missing_store_as_an_error_not_a_traceback(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert "no activation store" in capsys.readouterr().err
