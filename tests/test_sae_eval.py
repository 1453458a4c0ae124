"""Train a small SAE on a harvested store, evaluate it on held-out images: metrics, figures, grids, HTML."""

import json
import os
import re

import pytest

from activation_store.cli import main
from activation_store.harvest.config import HarvestConfig
from activation_store.harvest.model import ModelConfig
from activation_store.harvest.run import harvest
from harvest_helpers import TINY, make_images


def test_train_then_eval_writes_metrics_figures_grids_and_a_report(tmp_path, capsys):
    make_images(tmp_path / "imgs", 40)
    cfg = HarvestConfig(out=str(tmp_path / "s"), images=str(tmp_path / "imgs"), layers=[3],
                        model=ModelConfig(model=TINY, pretrained="none"), batch_size=8, workers=0, progress=False,
                        report=str(tmp_path / "h.json"))
    cfg.store.chunk_images, cfg.store.region_images = 4, 8
    harvest(cfg)
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "s"), "--location", "resid_3", "--out", str(run), "--latents", "256",
                 "--k", "8", "--batch-size", "256", "--total-tokens", "20000", "--lr", "1e-3", "--warmup-tokens",
                 "1000", "--checkpoint-every", "10000", "--buffer-tokens", "2000"]) == 0
    ckpt = sorted((run / "checkpoints").glob("[0-9]*"))[-1]
    out = tmp_path / "eval"
    assert main(["eval", str(run), "--out", str(out), "--batch-size", "512"]) == 0  # a run folder: its newest
    m = json.loads((out / "metrics.json").read_text())
    assert m["sae"] == str(ckpt)
    for key in ("mse", "explained_variance", "nmse", "l0", "never_fired_proportion", "active_feature_proportion_cls"):
        assert key in m
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert m["dead_proportion"] == last["dead_proportion"]  # the trainer's counters at that checkpoint
    assert len(m["tokenwise_mse"]) == 257 and m["l0"] <= 8 and m["eval_images"] > 0
    assert m["split"] == "eval"  # held-out images only
    for png in ("tokenwise_mse.png", "training_curves.png"):
        assert (out / png).stat().st_size > 1000
    assert m["grids"] and all((out / g["file"]).exists() for g in m["grids"])
    page = (out / "report.html").read_text()
    for src in re.findall(r'src="([^"]+)"', page):
        assert (out / src).exists(), src

    # a CLS-trained SAE is scored on CLS tokens (its checkpoint says so); --tokens overrides
    cls_run = tmp_path / "cls-run"
    assert main(["train", str(tmp_path / "s"), "--location", "resid_3", "--out", str(cls_run), "--tokens", "cls",
                 "--latents", "64", "--k", "4", "--batch-size", "8", "--total-tokens", "400", "--warmup-tokens", "0",
                 "--holdout", "0.25", "--buffer-tokens", "64"]) == 0
    assert main(["eval", str(cls_run), "--out", str(tmp_path / "cls-eval")]) == 0
    c = json.loads((tmp_path / "cls-eval" / "metrics.json").read_text())
    assert c["tokens"] == "cls" and c["eval_tokens"] == c["eval_images"] > 0 and c["holdout"] == 0.25
    assert c["tokenwise_mse"][0] == c["mse"] and all(v != v for v in c["tokenwise_mse"][1:])  # NaN: not scored
    assert main(["eval", str(cls_run), "--out", str(tmp_path / "all-eval"), "--tokens", "all"]) == 0
    a = json.loads((tmp_path / "all-eval" / "metrics.json").read_text())
    assert a["tokens"] == "all" and a["eval_tokens"] == 257 * c["eval_images"]

    # sort-eval material, judged by callables instead of an LLM
    from activation_store.sae.evaluate import EvalConfig, evaluate
    from activation_store.sae.sort_eval import run_sort_eval

    result = evaluate(EvalConfig(sae=str(ckpt), out=str(tmp_path / "sort"), top_n=2, query_candidates=2,
                                 sort_eval_pairs=20, min_images=1))
    folder = tmp_path / "sort" / "sort_eval"
    pairs = json.loads((folder / "pairs.json").read_text())
    assert result["sort_eval"]["pairs"] == len(pairs) > 0
    for p in pairs:
        assert all((folder / p[k]).exists() for k in ("grid_a", "grid_b", "query"))
    answers = {folder / p["query"]: p["answer"] for p in pairs}
    oracle = run_sort_eval(folder, lambda a, b, q: answers[q], subset=10, repeats=3)
    assert oracle["accuracy_mean"] == 1.0 and oracle["pairs"] == len(pairs)
    wrong = run_sort_eval(folder, lambda a, b, q: "B" if answers[q] == "A" else "A")
    assert wrong["accuracy_mean"] == 0.0

    capsys.readouterr()
    assert main(["eval", str(tmp_path / "h.json"), "--out", str(tmp_path / "bad")]) == 2
    assert "nor a CLIP-Scope .pt file; `actstore eval` also takes a run folder" in capsys.readouterr().err


def test_eval_of_a_clipscope_checkpoint_standardises_with_the_store_statistics(tmp_path):
    """CLIP-Scope trained on batches standardised by their own statistics and saved none; we
    evaluate their checkpoints on a store with its statistics (standardize), on every image."""
    import numpy as np
    import torch

    from activation_store.errors import ConfigError
    from activation_store.sae.evaluate import EvalConfig, evaluate
    from activation_store.store import ActivationStore, ImageRecord, StoreConfig
    from test_sae_model import clipscope_forward, make_clipscope_checkpoint

    rng = np.random.default_rng(0)
    acts = (rng.standard_normal((8, 257, 16)) * rng.uniform(0.5, 4, 16) + rng.normal(0, 3, 16)).astype(np.float32)
    store = ActivationStore.create(str(tmp_path / "s"), locations="resid_22", n_tokens=257, d_model=16,
                                   config=StoreConfig(dtype="fp32", chunk_images=4, region_images=4))
    store.plan_shards([("a", 8)])
    with store.writer("a") as w:
        w.add({"resid_22": acts}, [ImageRecord(str(i)) for i in range(8)])
    state = make_clipscope_checkpoint(tmp_path / "1200013184.pt", d=16, n=64, k=4)

    result = evaluate(EvalConfig(sae=str(tmp_path / "1200013184.pt"), store=str(tmp_path / "s"),
                                 location="resid_22", out=str(tmp_path / "eval"), top_n=2, min_images=1))
    x = torch.from_numpy(acts.reshape(-1, 16)).double()
    x = ((x - x.mean(0)) / (x.var(0, unbiased=False).sqrt() + 1e-6)).float()
    _, x_hat = clipscope_forward(state, 4, x)
    assert result["normalization"] == "standardize" and result["split"] == "all" and result["eval_images"] == 8
    np.testing.assert_allclose(result["mse"], float((x - x_hat).pow(2).sum(-1).mean()), rtol=1e-3)
    assert (tmp_path / "eval" / "report.html").exists()
    with pytest.raises(ConfigError, match="give both"):
        evaluate(EvalConfig(sae=str(tmp_path / "1200013184.pt"), out=str(tmp_path / "e2")))


def test_the_report_renders_in_headless_chromium_with_every_image_loaded(tmp_path):
    import shutil
    import subprocess

    import pytest

    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    from activation_store.sae.report import write_html

    out = tmp_path / "report"
    (out / "grids").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (30, 20), (10, 200, 10)).save(out / "tokenwise_mse.png")
    Image.new("RGB", (30, 30), (200, 10, 10)).save(out / "grids" / "latent00001_cls.png")
    result = {"location": "resid_22", "split": "eval", "eval_images": 3, "eval_tokens": 771, "mse": 1.0, "grids": [
        {"latent": 1, "token": "cls", "file": "grids/latent00001_cls.png", "values": [1.0, 0.5]}]}
    write_html(result, {"tokenwise": "tokenwise_mse.png"}, out)
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--allow-file-access-from-files", "--dump-dom",
         (out / "report.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'data-images-loaded="2/2"' in dom
    # a missing image is caught
    (out / "grids" / "latent00001_cls.png").unlink()
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile2'}",
         "--allow-file-access-from-files", "--dump-dom", (out / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120).stdout
    assert 'data-images-loaded="1/2"' in dom


def test_training_curves_survive_an_empty_or_cut_log(tmp_path):
    from activation_store.sae.report import curves_png

    log = tmp_path / "metrics.jsonl"
    log.write_text("")
    assert curves_png(log, tmp_path / "a.png") is None and not (tmp_path / "a.png").exists()
    log.write_text('{"tokens": 10, "mse": 1.0, "l0": 4}\n{"tokens": 20, "mse": 0.5, "l0": 4}\n{"tokens": 3')
    assert curves_png(log, tmp_path / "b.png") == "b.png" and (tmp_path / "b.png").stat().st_size > 1000


def test_report_tiles_come_from_where_the_bytes_live(tmp_path, monkeypatch):
    """A folder harvested by a relative path, evaluated from another directory, and a tar shard read
    by byte range: every tile is found (none grey), and a moved source is counted, not hidden."""
    import tarfile

    from activation_store.sae.report import ImageFetcher
    from activation_store.store import open_store
    from harvest_helpers import write_tar

    make_images(tmp_path / "imgs", 6)
    monkeypatch.chdir(tmp_path)
    for name, source in (("folder", {"images": "imgs"}), ("tar", {"shards": "data.tar"})):
        if name == "tar":
            write_tar(tmp_path / "data.tar", [(p.stem, {"jpg": p.read_bytes()}) for p in sorted((tmp_path / "imgs").iterdir())])
        cfg = HarvestConfig(out=str(tmp_path / name), layers=[3], model=ModelConfig(model=TINY, pretrained="none"),
                            batch_size=3, workers=0, progress=False, report=str(tmp_path / f"{name}.json"), **source)
        harvest(cfg)
    monkeypatch.chdir("/")
    for name in ("folder", "tar"):
        store = open_store(str(tmp_path / name))
        table = store.images().to_pylist()
        assert all(r["data_url"] and os.path.isabs(r["data_url"]) for r in table), table[0]
        fetch = ImageFetcher(store)
        tiles = [fetch.get(r["row"]) for r in table]
        assert fetch.missing == {} and all(t.size != (224, 224) for t in tiles), (name, fetch.missing)
    tar_rows = open_store(str(tmp_path / "tar")).images().to_pylist()
    with tarfile.open(tmp_path / "data.tar") as tar:
        member = tar.getmember(tar_rows[0]["key"] + ".jpg")
        assert (tar_rows[0]["data_offset"], tar_rows[0]["data_size"]) == (member.offset_data, member.size)
    os.rename(tmp_path / "imgs", tmp_path / "moved")
    fetch = ImageFetcher(open_store(str(tmp_path / "folder")))
    fetch.get(0)
    assert fetch.missing == {"source file gone": 1}


def test_eval_takes_hub_names_as_from_pretrained_does_offline(tmp_path, monkeypatch, capsys):
    """`actstore eval 22_resid/1200013184.pt STORE` fetches the file from CLIP-Scope's repo (or
    --repo-id) with huggingface_hub, here replaced by a local lookup; a missing name is one line."""
    import huggingface_hub
    import numpy as np

    from activation_store.store import ActivationStore, ImageRecord, StoreConfig
    from test_sae_model import make_clipscope_checkpoint

    acts = np.random.default_rng(0).standard_normal((8, 257, 16)).astype(np.float32)
    store = ActivationStore.create(str(tmp_path / "s"), locations="resid_22", n_tokens=257, d_model=16,
                                   config=StoreConfig(dtype="fp32", chunk_images=4, region_images=4))
    store.plan_shards([("a", 8)])
    with store.writer("a") as w:
        w.add({"resid_22": acts}, [ImageRecord(str(i)) for i in range(8)])
    hub = {("lewington/CLIP-ViT-L-scope", "22_resid/1200013184.pt"): tmp_path / "theirs.pt",
           ("someone/their-saes", "layer22.pt"): tmp_path / "other.pt"}
    make_clipscope_checkpoint(hub[("lewington/CLIP-ViT-L-scope", "22_resid/1200013184.pt")], d=16, n=64, k=4)
    make_clipscope_checkpoint(hub[("someone/their-saes", "layer22.pt")], d=16, n=32, k=2, seed=1)
    asked = []

    def fake_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        if (repo_id, filename) not in hub:
            raise FileNotFoundError(f"404 Client Error.\n\nEntry Not Found for url: "
                                    f"https://huggingface.co/{repo_id}/resolve/main/{filename}.")
        return str(hub[(repo_id, filename)])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.chdir(tmp_path)  # "22_resid/..." is no local path here
    common = [str(tmp_path / "s"), "--location", "resid_22", "--top-n", "2", "--min-images", "1"]
    assert main(["eval", "22_resid/1200013184.pt", *common, "--out", str(tmp_path / "e1")]) == 0
    m = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    assert m["normalization"] == "standardize" and m["eval_images"] == 8 and m["l0"] <= 4
    assert main(["eval", "layer22.pt", *common, "--repo-id", "someone/their-saes", "--out", str(tmp_path / "e2")]) == 0
    assert json.loads((tmp_path / "e2" / "metrics.json").read_text())["l0"] <= 2
    assert asked == [("lewington/CLIP-ViT-L-scope", "22_resid/1200013184.pt"), ("someone/their-saes", "layer22.pt")]
    capsys.readouterr()
    assert main(["eval", "22_resid/999.pt", *common, "--out", str(tmp_path / "e3")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "22_resid/999.pt is no local path" in err and "lewington/CLIP-ViT-L-scope" in err
    assert "Entry Not Found" in err
    # a missing absolute path is reported as missing, never looked up on the hub
    assert main(["eval", str(tmp_path / "gone.pt"), *common, "--out", str(tmp_path / "e4")]) == 2
    assert "neither an activation-store run" in capsys.readouterr().err and len(asked) == 3
