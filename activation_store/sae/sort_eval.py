"""Sort-eval material, as CLIP-Scope ran it: pairs of latents, each shown as a 3x3 grid of its top
images, and a query image that activates one of the two but is in neither grid; a judge (an LLM
in their case: any callable here, so tests need no network) says which latent the query belongs
to. Accuracy is averaged over random subsets of the pairs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from activation_store.sae.report import grid_png


def write_sort_eval(top, fires_on: torch.Tensor, cfg, images, folder: Path) -> dict:
    """Write `pairs.json` and the grid and query images for up to `cfg.sort_eval_pairs` pairs of
    latents that fire on more images than their grid shows (so a query image exists)."""
    folder.mkdir(parents=True, exist_ok=True)
    n_top = cfg.top_n
    eligible = [int(i) for i in torch.nonzero(fires_on > n_top).flatten()[: cfg.first_latents]
                if top.values[n_top, i] > 0]
    rng = np.random.default_rng(cfg.seed)
    pairs = []
    if len(eligible) >= 2:
        for _ in range(cfg.sort_eval_pairs):
            a, b = (int(x) for x in rng.choice(eligible, size=2, replace=False))
            truth = "A" if rng.random() < 0.5 else "B"
            owner = a if truth == "A" else b
            other_rows = {int(r) for r in top.rows[:n_top, a if owner == b else b]}
            candidates = [int(r) for r, v in zip(top.rows[n_top:, owner], top.values[n_top:, owner])
                          if v > 0 and int(r) not in other_rows]
            if not candidates:
                continue
            i = len(pairs)
            files = {"grid_a": f"pair{i:04d}_a.png", "grid_b": f"pair{i:04d}_b.png", "query": f"pair{i:04d}_query.png"}
            grid_png([images.get(int(r)) for r in top.rows[:n_top, a]], folder / files["grid_a"])
            grid_png([images.get(int(r)) for r in top.rows[:n_top, b]], folder / files["grid_b"])
            images.get(candidates[0]).save(folder / files["query"])
            pairs.append({"latent_a": a, "latent_b": b, "answer": truth, "query_row": candidates[0], **files})
    (folder / "pairs.json").write_text(json.dumps(pairs, indent=2))
    return {"pairs": len(pairs), "folder": str(folder)}


def run_sort_eval(folder: str | Path, judge: Callable[[Path, Path, Path], str], subset: int = 400,
                  repeats: int = 5, seed: int = 0) -> dict:
    """Ask `judge(grid_a, grid_b, query) -> 'A' | 'B'` about every pair; accuracy over `repeats`
    random subsets of `subset` pairs (all pairs when fewer): mean and standard deviation."""
    folder = Path(folder)
    pairs = json.loads((folder / "pairs.json").read_text())
    if not pairs:
        return {"pairs": 0, "accuracy_mean": None, "accuracy_std": None}
    correct = np.array([judge(folder / p["grid_a"], folder / p["grid_b"], folder / p["query"]) == p["answer"]
                        for p in pairs], dtype=float)
    rng = np.random.default_rng(seed)
    size = min(subset, len(pairs))
    accs = [correct[rng.choice(len(pairs), size=size, replace=False)].mean() for _ in range(repeats)]
    return {"pairs": len(pairs), "subset": size, "accuracy_mean": float(np.mean(accs)),
            "accuracy_std": float(np.std(accs))}
