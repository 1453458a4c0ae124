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
