"""The harvest end to end: bad input counted, webdataset and URL sources, kill -9 and resume,
several ranks, config files."""

import functools
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from activation_store.cli import main
from activation_store.harvest.config import HarvestConfig
from activation_store.harvest.model import ModelConfig
from activation_store.harvest.run import harvest
from activation_store.store import open_store
from harvest_helpers import TINY, bad_corpus, jpeg_bytes, make_images, write_tar


def cfg_for(out, **kw):
    cfg = HarvestConfig(out=str(out), model=ModelConfig(model=TINY, pretrained="none"), layers=[1, 3], batch_size=3,
                        workers=kw.pop("workers", 0), progress=False, report=str(out) + ".report.json", **kw)
    cfg.store.chunk_images, cfg.store.region_images = 4, 8
    return cfg


def data_objects(url):
    """Every object holding data (chunks, statistics) by key, and the image tables."""
    s = open_store(url)
    files = s.storage.list_files("")
    objects = {k: s.storage.read_bytes(k) for k in files if "/c/" in k}
    return objects, s.images(include_dropped=True).sort_by("key")


def test_bad_image_corpus_is_counted_and_never_stored(tmp_path):
    folder = tmp_path / "bad"
    expected = bad_corpus(folder)
    make_images(folder, 2)
    report = harvest(cfg_for(tmp_path / "s", images=str(folder), workers=2))
    dropped = {name: status for name, status in expected.items() if status}
    by_status = report["images"]["by_status"]
    assert by_status["ok"] == 2 + sum(1 for s in expected.values() if s is None)
    for status in set(dropped.values()):
        assert by_status[status] == list(dropped.values()).count(status)
    assert report["images"]["converted_to_rgb"] == {
        "converted_from_RGBA": 1, "converted_from_CMYK": 1, "converted_from_P": 1, "converted_from_L": 1,
        "converted_from_I;16": 1}
    store = open_store(str(tmp_path / "s"))
    table = store.images(include_dropped=True)
    status_of = dict(zip(table["key"].to_pylist(), table["status"].to_pylist()))
    row_of = dict(zip(table["key"].to_pylist(), table["row"].to_pylist()))
    for name, status in dropped.items():
        assert status_of[name] == status and row_of[name] == -1
    assert store.n_images == by_status["ok"]
    assert json.load(open(report["report_path"]))["images"]["by_status"] == by_status


def test_webdataset_shards_with_captions_and_a_truncated_tar(tmp_path):
    samples = [(f"{i:09d}", {"jpg": jpeg_bytes(i), "txt": f"caption {i}".encode(),
                             "json": json.dumps({"url": f"http://example.invalid/{i}.jpg"}).encode()}) for i in range(5)]
    write_tar(tmp_path / "data-000.tar", samples[:3])
    write_tar(tmp_path / "data-001.tar", samples[3:])
    with tarfile.open(tmp_path / "data-001.tar") as tar:
        cut = tar.getmember("000000004.jpg").offset_data + 100
    broken = (tmp_path / "data-001.tar").read_bytes()
    (tmp_path / "data-001.tar").write_bytes(broken[:cut])  # cut inside the 5th sample's image
    report = harvest(cfg_for(tmp_path / "s", shards=str(tmp_path / "data-{000..001}.tar")))
    assert report["images"]["by_status"] == {"ok": 4, "truncated_tar": 1}
    table = open_store(str(tmp_path / "s")).images()
    assert table["caption"].to_pylist()[:3] == ["caption 0", "caption 1", "caption 2"]
    assert table["url"].to_pylist()[0] == "http://example.invalid/0.jpg"
    assert table["source_shard"].to_pylist()[0].endswith("data-000.tar")


@pytest.fixture
def web_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    for i in range(5):
        (root / f"{i}.jpg").write_bytes(jpeg_bytes(i))
    (root / "junk.jpg").write_bytes(b"this is not an image at all")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_urls_through_img2dataset_into_the_store(tmp_path, web_server, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{s.getsockname()[1]}/x.jpg"  # nothing listens there once closed
    urls = [f"{web_server}/{i}.jpg" for i in range(5)] + [f"{web_server}/missing.jpg", refused, f"{web_server}/junk.jpg"]
    pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(len(urls))]}), tmp_path / "urls.parquet")
    cfg = cfg_for(tmp_path / "s", urls=str(tmp_path / "urls.parquet"))
    cfg.download.number_sample_per_shard, cfg.download.processes_count, cfg.download.thread_count = 3, 1, 4
    report = harvest(cfg)
    assert report["images"]["by_status"] == {"ok": 5, "download_error": 2, "not_an_image": 1}
    assert report["download"]["img2dataset"]["count"] == 8
    assert report["download"]["img2dataset"]["failed_to_download"] == 2
    store = open_store(str(tmp_path / "s"))
    assert store.n_images == 5 and len(store.committed_shards()) == 3
    table = store.images(include_dropped=True)
    errors = [e for e, s in zip(table["error"].to_pylist(), table["status"].to_pylist()) if s == "download_error"]
    assert any("404" in e for e in errors) and any("refused" in e.lower() for e in errors)
    assert sorted(store.images()["caption"].to_pylist()) == ["c0", "c1", "c2", "c3", "c4"]


def _cli(out, folder, *extra):
    return [sys.executable, "-m", "activation_store.cli", "harvest", "--images", str(folder), "--out", str(out),
            "--model", TINY, "--pretrained", "none", "--layers", "1,3", "--batch-size", "2", "--workers", "0",
            "--chunk-images", "4", "--region-images", "8", "--shard-size", "12", "--no-progress",
            "--report", str(out) + ".rank{rank}.json", *extra]


def test_sigkill_mid_harvest_then_rerun_gives_the_uninterrupted_store(tmp_path):
    folder = tmp_path / "imgs"
    make_images(folder, 36)  # 3 input shards of 12 images, 6 batches of 2 each
    env = {k: v for k, v in os.environ.items() if k != "ACTSTORE_KILL_AT"}
    subprocess.run(_cli(tmp_path / "ref", folder), check=True, capture_output=True, env=env)

    out = tmp_path / "s"
    # killed right after its 9th batch went to the shard writer: shard 0 done, shard 1 half written
    killed = subprocess.run(_cli(out, folder), capture_output=True, env=dict(env, ACTSTORE_KILL_AT="harvest_batch:9"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    partial = open_store(str(out))
    assert [s.state for s in partial.shards()] == ["committed", "writing", "planned"]
    assert partial.n_images == 12  # only the committed shard is visible
    rerun = subprocess.run(_cli(out, folder), capture_output=True, env=env)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    got, got_table = data_objects(str(out))
    want, want_table = data_objects(str(tmp_path / "ref"))
    assert sorted(got) == sorted(want)
    assert all(got[k] == want[k] for k in want)
    assert got_table.equals(want_table)


def test_two_ranks_give_the_same_store_as_one(tmp_path):
    folder = tmp_path / "imgs"
    make_images(folder, 30)
    subprocess.run(_cli(tmp_path / "one", folder), check=True, capture_output=True)
    procs = [subprocess.Popen(_cli(tmp_path / "two", folder, "--rank", str(r), "--world-size", "2"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    reports = [json.load(open(f"{tmp_path / 'two'}.rank{r}.json")) for r in (0, 1)]
    assert [r["input_shards"]["harvested"] for r in reports] == [2, 1]
    got, got_table = data_objects(str(tmp_path / "two"))
    want, want_table = data_objects(str(tmp_path / "one"))
    assert sorted(got) == sorted(want) and all(got[k] == want[k] for k in want)
    assert got_table.equals(want_table)


def test_config_file_with_flags_overriding_it(tmp_path, capsys):
    folder = tmp_path / "imgs"
    make_images(folder, 4)
    conf = tmp_path / "harvest.toml"
    conf.write_text(f"""
layers = [0, 1]
batch_size = 2
workers = 0
[model]
model = "{TINY}"
pretrained = "none"
seed = 7
[store]
chunk_images = 4
region_images = 8
dtype = "bf16"
""")
    out = tmp_path / "s"
    assert main(["harvest", "--config", str(conf), "--images", str(folder), "--out", str(out), "--layers", "2",
                 "--no-progress"]) == 0
    assert "stored 4 of 4 images" in capsys.readouterr().out
    store = open_store(str(out))
    assert store.locations == ["resid_2"] and store.dtype == "bf16"
    assert store.attrs["model"]["seed"] == 7
    bad = tmp_path / "bad.toml"
    bad.write_text("layerz = [1]\n")
    assert main(["harvest", "--config", str(bad), "--images", str(folder), "--out", str(tmp_path / "x")]) == 2
    assert "unknown keys ['layerz']" in capsys.readouterr().err
