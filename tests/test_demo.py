"""The README's first command runs the whole flow; here with the tiny ViT so it takes seconds."""

import json

from activation_store.demo import run_demo
from harvest_helpers import TINY


def test_demo_runs_the_whole_flow_to_an_html_report(tmp_path, capsys):
    assert run_demo(str(tmp_path / "demo"), model=TINY, pretrained="none", compute_dtype="fp32", layers="1,3") == 0
    out = tmp_path / "demo"
    report = json.loads((out / "harvest-report.json").read_text())
    assert report["images"]["stored"] == 10 and report["random_weights"]
    assert (out / "sae-resid_3" / "metrics.jsonl").exists()
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["location"] == "resid_3" and metrics["eval_images"] >= 1
    html = (out / "eval" / "report.html").read_text()
    assert "<img" in html
    printed = capsys.readouterr().out
    assert "verify: OK" in printed and "trained a TopK SAE" in printed and "eval/report.html" in printed


def test_demo_with_fp8_reads_and_trains_on_the_converted_store(tmp_path, capsys):
    """`actstore demo --store-dtype fp8`: the harvest's fp16 store converted to fp8 (store-fp8.zarr),
    and info, verify, the shuffled read, training and the report all on that one."""
    from activation_store.store import open_store

    assert run_demo(str(tmp_path / "demo"), model=TINY, pretrained="none", compute_dtype="fp32", layers="1,3",
                    store_dtype="fp8") == 0
    out = tmp_path / "demo"
    fp8 = open_store(str(out / "store-fp8.zarr"))
    assert fp8.dtype == "fp8" and fp8.quantized and fp8.n_images == 10
    assert open_store(str(out / "store.zarr")).dtype == "fp16"  # the harvest's own store is kept
    summary = json.loads((out / "store-info.json").read_text())
    assert summary["url"].endswith("store-fp8.zarr")
    assert summary["per_location"]["resid_3"]["bytes_per_value"] < 1.1  # 1 byte + 4 / 64 of a scale, + padding
    assert summary["per_location"]["resid_3"]["lossy_error"]["complete"]
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["location"] == "resid_3" and metrics["eval_images"] >= 1
    assert metrics["store"].endswith("store-fp8.zarr")  # the SAE was trained and evaluated on the fp8 store
    assert "<img" in (out / "eval" / "report.html").read_text()
    printed = capsys.readouterr().out
    assert "converted to fp8" in printed and "verify: OK" in printed and "eval/report.html" in printed
