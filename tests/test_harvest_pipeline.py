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
from activation_store.errors import ConfigError
from activation_store.harvest import sources, urls
from activation_store.harvest.run import harvest
from activation_store.store import open_store
from harvest_helpers import TINY, bad_corpus, cfg_for, data_objects, jpeg_bytes, make_images, write_tar


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
    # a file:// URL in the middle of a shard: refused even with private addresses allowed, never downloaded
    urls = ([f"{web_server}/{i}.jpg" for i in range(4)] + ["file:///etc/passwd", f"{web_server}/4.jpg",
            f"{web_server}/missing.jpg", refused, f"{web_server}/junk.jpg"])
    pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(len(urls))]}), tmp_path / "urls.parquet")
    cfg = cfg_for(tmp_path / "s", urls=str(tmp_path / "urls.parquet"))
    cfg.download.number_sample_per_shard, cfg.download.processes_count, cfg.download.thread_count = 3, 1, 4
    cfg.download.allow_private_urls = True  # the test server is on the loopback address
    report = harvest(cfg)
    assert report["images"]["by_status"] == {"ok": 5, "download_error": 2, "not_an_image": 1, "refused_url": 1}
    assert report["download"]["img2dataset"]["count"] == 8
    assert report["download"]["img2dataset"]["failed_to_download"] == 2
    store = open_store(str(tmp_path / "s"))
    assert store.n_images == 5 and len(store.committed_shards()) == 3
    table = store.images(include_dropped=True)
    errors = [e for e, s in zip(table["error"].to_pylist(), table["status"].to_pylist()) if s == "download_error"]
    assert any("404" in e for e in errors) and any("refused" in e.lower() for e in errors)
    assert sorted(store.images()["caption"].to_pylist()) == ["c0", "c1", "c2", "c3", "c5"]
    row = table.filter(pa.compute.equal(table["status"], "refused_url")).to_pylist()[0]
    assert row["url"] == "file:///etc/passwd" and row["caption"] == "c4" and row["row"] == -1
    assert "only http(s) URLs are downloaded" in row["error"]
    for tar in (tmp_path / "s.downloads").rglob("*.tar"):  # nothing of /etc/passwd was fetched
        assert b"root:" not in tar.read_bytes()
    # every stored image is found again in its downloaded shard, by byte range (the report's grids)
    from activation_store.sae.report import ImageFetcher

    fetch = ImageFetcher(store)
    stored = store.images().to_pylist()
    assert all(r["data_url"].endswith(".tar") and r["data_offset"] >= 0 for r in stored)
    assert all(fetch.get(r["row"]).size != (224, 224) for r in stored) and fetch.missing == {}


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


# ---------------------------------------------------------------------------- sources: identity and bad entries
def _two_tars(folder):
    folder.mkdir()
    write_tar(folder / "x-000.tar", [(f"{i:03d}", {"jpg": jpeg_bytes(i)}) for i in range(3)])
    write_tar(folder / "x-001.tar", [(f"{i:03d}", {"jpg": jpeg_bytes(i)}) for i in range(3, 5)])


def test_a_tar_is_one_input_shard_however_its_path_is_typed(tmp_path, monkeypatch):
    _two_tars(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    first = harvest(cfg_for(tmp_path / "s", shards="data/x-{000..001}.tar"))
    assert first["input_shards"]["harvested"] == 2
    for typed in (str(tmp_path / "data" / "x-{000..001}.tar"), "./data/x-{000..001}.tar",
                  f"file://{tmp_path}/data/x-{{000..001}}.tar", "data/../data/x-{000..001}.tar"):
        again = harvest(cfg_for(tmp_path / "s", shards=typed))
        assert again["input_shards"] == {"total": 2, "this_rank": 2, "skipped_committed": 2, "harvested": 0}, typed
    store = open_store(str(tmp_path / "s"))
    assert [s.source for s in store.shards()] == [str(tmp_path / "data" / f"x-00{i}.tar") for i in (0, 1)]
    assert store.n_images == 5
    with pytest.raises(ConfigError, match="names the same tar more than once"):
        harvest(cfg_for(tmp_path / "t", shards="{data/x-000.tar,./data/x-000.tar}"))


def test_a_store_planned_under_the_path_as_typed_keeps_its_shards(tmp_path, monkeypatch):
    _two_tars(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as m:  # as stores were planned before names were normalised
        m.setattr(sources, "source_name", lambda url, storage_options=None: url)
        harvest(cfg_for(tmp_path / "s", shards="data/x-{000..001}.tar"))
    again = harvest(cfg_for(tmp_path / "s", shards="data/x-{000..001}.tar"))
    assert again["input_shards"]["skipped_committed"] == 2
    assert [s.source for s in open_store(str(tmp_path / "s")).shards()] == ["data/x-000.tar", "data/x-001.tar"]


def test_repeated_keys_in_a_tar_are_counted_drops_and_the_shard_commits(tmp_path):
    # a key that comes back later (a), and a sample with two jpg files (c); the first occurrences are stored
    write_tar(tmp_path / "x.tar", [("a", {"jpg": jpeg_bytes(0)}), ("b", {"jpg": jpeg_bytes(1)}),
                                   ("a", {"jpg": jpeg_bytes(2, (40, 60))}), ("c", {"jpg": jpeg_bytes(3)}),
                                   ("c", {"jpg": jpeg_bytes(4, (40, 60))}), ("d", {"jpg": jpeg_bytes(5)})])
    report = harvest(cfg_for(tmp_path / "s", shards=str(tmp_path / "x.tar")))
    assert report["images"]["by_status"] == {"ok": 4, "duplicate_key": 2}
    store = open_store(str(tmp_path / "s"))
    assert len(store.committed_shards()) == 1 and store.n_images == 4
    assert store.shards()[0].capacity == 4  # planned for what the reader can store
    rows = sorted(store.images(include_dropped=True).to_pylist(), key=lambda r: r["source_row"])
    assert [(r["key"], r["status"]) for r in rows] == [("a", "ok"), ("b", "ok"), ("a", "duplicate_key"), ("c", "ok"),
                                                      ("c", "duplicate_key"), ("d", "ok")]
    assert all(r["width"] == 128 for r in rows if r["status"] == "ok")  # never the later (60 px wide) ones
    dup_a, dup_c = (r for r in rows if r["status"] == "duplicate_key")
    assert dup_a["row"] == dup_c["row"] == -1
    assert dup_a["error"].startswith(f"{tmp_path / 'x.tar'}: key 'a' comes back after other samples at tar member "
                                     "'a.jpg'")
    assert "key 'c' has a second 'jpg' file at tar member 'c.jpg'" in dup_c["error"]


def test_check_urls_refuses_what_is_not_http_to_a_public_address(monkeypatch):
    names = {"intranet.example": ["10.1.2.3"], "public.example": ["93.184.216.34"],
             "mixed.example": ["127.0.0.1", "93.184.216.34"]}
    monkeypatch.setattr(urls, "resolve_host", names.get)  # unknown names do not resolve
    cases = {
        "https://public.example/a.jpg": None, "HTTP://93.184.216.34:8080/a.jpg": None,
        "http://nowhere.example/a.jpg": None,  # does not resolve: left to img2dataset, which fails it
        "file:///etc/passwd": "scheme 'file': only http(s) URLs are downloaded (--download-allow-file-urls",
        "ftp://public.example/a.jpg": "scheme 'ftp': only http(s)", "/etc/passwd": "scheme '(none)'",
        "http://127.0.0.1:8000/a.jpg": "127.0.0.1 is a loopback address (--download-allow-private-urls",
        "http://[::1]/a.jpg": "::1 is a loopback address", "http://[::ffff:10.0.0.1]/": "is a private address",
        "http://169.254.169.254/latest/meta-data/": "is a link-local address", "http://10.0.0.7/": "private address",
        "http://0.0.0.0/": "unspecified address", "http://100.64.0.1/": "non-public address",
        "http://intranet.example/a.jpg": "intranet.example resolves to the private address 10.1.2.3",
        "http://mixed.example/": "mixed.example resolves to the loopback address 127.0.0.1",
        "http:///a.jpg": "no host in the URL", "": "no URL", None: "no URL", "http://[::1/": "not a URL",
    }
    got = dict(zip(cases, urls.check_urls(list(cases))))
    for url, want in cases.items():
        assert got[url] is None if want is None else want in (got[url] or ""), (url, got[url])
    opened = dict(zip(cases, urls.check_urls(list(cases), allow_private=True)))
    assert all(opened[u] is None for u in cases if u and u.startswith("http") and "///" not in u and "[::1/" not in u)
    assert opened["file:///etc/passwd"].startswith("scheme 'file'")  # file:// has its own opt-in
    assert urls.check_urls(["file:///etc/passwd"], allow_file=True) == [None]


def test_check_urls_resolves_names_and_numeric_forms_of_an_address():
    # no network needed: localhost comes from /etc/hosts, 2130706433 is 127.0.0.1 written as one number
    got = urls.check_urls(["http://localhost:8000/a.jpg", "http://2130706433/a.jpg"])
    assert all(g and "resolves to the loopback address" in g for g in got), got


def test_refused_urls_are_counted_and_never_handed_to_img2dataset(tmp_path, monkeypatch):
    listed = ["file:///etc/passwd", "http://127.0.0.1:9/x.jpg", "http://169.254.169.254/latest/meta-data/",
              "gopher://example.invalid/x"]
    pq.write_table(pa.table({"url": listed, "caption": ["a", "b", "c", "d"]}), tmp_path / "urls.parquet")

    def no_download(*args, **kwargs):
        raise AssertionError(f"img2dataset was started: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_download)
    cfg = cfg_for(tmp_path / "s", urls=str(tmp_path / "urls.parquet"))
    cfg.download.number_sample_per_shard = 2
    report = harvest(cfg)
    assert report["images"]["by_status"] == {"refused_url": 4} and report["input_shards"]["harvested"] == 2
    store = open_store(str(tmp_path / "s"))
    assert len(store.committed_shards()) == 2 and store.n_images == 0
    rows = sorted(store.images(include_dropped=True).to_pylist(), key=lambda r: (r["source_shard"], r["source_row"]))
    assert [(r["url"], r["caption"], r["status"]) for r in rows] == [(u, c, "refused_url")
                                                                      for u, c in zip(listed, "abcd")]
    assert "loopback" in rows[1]["error"] and "link-local" in rows[2]["error"]


def test_the_new_switches_are_flags(capsys):
    assert main(["harvest", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--download-allow-private-urls" in out and "--download-allow-file-urls" in out
    assert "--follow-external-symlinks" in out


@pytest.mark.timeout(120)  # a safety net: opening a FIFO would block forever
def test_folder_entries_that_are_no_regular_file_are_counted_and_never_opened(tmp_path):
    folder = tmp_path / "imgs"
    make_images(folder, 3)
    os.mkfifo(folder / "pipe.jpg")
    os.mkfifo(folder / "img001.txt")  # where a caption would be: not read either
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(folder / "sock.jpg"))
    (folder / "dir.jpg").mkdir()  # a directory named like an image; the image in it is a sample of its own
    make_images(folder / "dir.jpg", 1)
    make_images(tmp_path / "elsewhere", 1)
    os.symlink(tmp_path / "elsewhere" / "img000.jpg", folder / "outside.jpg")
    os.symlink(folder / "img000.jpg", folder / "inside.jpg")
    os.symlink(folder / "gone.jpg", folder / "broken.jpg")
    os.symlink(folder / "dir.jpg", folder / "linked-dir")  # links to directories are not searched
    report = harvest(cfg_for(tmp_path / "s", images=str(folder)))
    assert report["images"]["by_status"] == {"ok": 5, "not_a_file": 5, "outside_folder": 1, "unreadable_file": 1}
    rows = {r["key"]: r for r in open_store(str(tmp_path / "s")).images(include_dropped=True).to_pylist()}
    assert {k: r["status"] for k, r in rows.items() if r["status"] != "ok"} == {
        "pipe.jpg": "not_a_file", "img001.txt": "not_a_file", "sock.jpg": "not_a_file", "dir.jpg": "not_a_file",
        "linked-dir": "not_a_file", "outside.jpg": "outside_folder", "broken.jpg": "unreadable_file"}
    assert sorted(k for k, r in rows.items() if r["status"] == "ok") == [
        "dir.jpg/img000.jpg", "img000.jpg", "img001.jpg", "img002.jpg", "inside.jpg"]
    assert "FIFO" in rows["pipe.jpg"]["error"] and "socket" in rows["sock.jpg"]["error"]
    assert "--follow-external-symlinks" in rows["outside.jpg"]["error"] and rows["img001.jpg"]["caption"] is None

    followed = harvest(cfg_for(tmp_path / "t", images=str(folder), follow_external_symlinks=True))
    assert followed["images"]["by_status"] == {"ok": 6, "not_a_file": 5, "unreadable_file": 1}


def test_cuda_graph_on_a_cpu_device_is_refused_with_what_to_do(tmp_path, capsys):
    folder = tmp_path / "imgs"
    make_images(folder, 3)
    with pytest.raises(ConfigError, match="--cuda-graph needs a CUDA device.*--device cuda"):
        cfg_for(tmp_path / "s", images=str(folder), cuda_graph=True)
    assert main(["harvest", "--images", str(folder), "--out", str(tmp_path / "s"), "--cuda-graph"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cuda-graph needs a CUDA device" in err[0]
    assert not (tmp_path / "s").exists()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (the graph is CUDA's)")
@pytest.mark.parametrize("store_dtype", ["fp16", "fp8"])
def test_a_harvest_replaying_a_cuda_graph_writes_the_eager_harvests_bytes(tmp_path, store_dtype):
    # 11 images in batches of 3: three full batches replayed (graphs of both device buffers, each
    # reused), a partial one eager; the same kernels on the same inputs give the same bits
    folder = tmp_path / "imgs"
    make_images(folder, 11)
    stores = {}
    for graph in (False, True):
        out = tmp_path / f"graph_{graph}"
        cfg = cfg_for(out, images=str(folder))
        cfg.model.device, cfg.cuda_graph = "cuda", graph
        cfg.store.dtype = store_dtype
        harvest(cfg)
        stores[graph] = data_objects(str(out))
    (got, got_table), (want, want_table) = stores[True], stores[False]
    assert sorted(got) == sorted(want) and all(got[k] == want[k] for k in want)
    assert got_table.equals(want_table)
