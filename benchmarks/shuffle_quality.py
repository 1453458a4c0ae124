"""Shuffle quality of ShuffledReader against its buffer size, from the ids it yields.

- max image share: the largest fraction of a batch that comes from a single image (mean and worst
  over batches); uniform sampling over the whole store gives about 1-3 / batch_size;
- mixing: distinct images among 256 rows of a batch, divided by its expectation under uniform
  sampling without replacement (1.0 = as mixed as a perfect shuffle; the measure of the shared
  REFERENCE's table of peer loaders);
- order correlation: Spearman correlation between batch number and the batch's mean image row
  (0 = batch order says nothing about store order).

    python benchmarks/shuffle_quality.py
    python benchmarks/shuffle_quality.py --memory 128MB,512MB,1GB,2GB,4GB   # the mixing a memory budget gives

With --memory, each budget is turned into the windows a reader with that `memory` setting gets
on a d_model 1024 fp16 store of 16-image chunks (`--memory-d-model`; the reader's own sizing,
`readers.engine.window_plan`), and the quality store is read with windows of that many tokens.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from activation_store import ShuffledReader
from activation_store.store import ActivationStore, ImageRecord, StoreConfig


def expected_distinct(n_images: int, tokens_per_image: int, k: int) -> float:
    """E[distinct images] among k rows drawn without replacement from n_images * tokens_per_image."""
    total = n_images * tokens_per_image
    # P(an image is missed) = C(total - t, k) / C(total, k)
    miss = np.exp(np.sum(np.log1p(-tokens_per_image / (total - np.arange(k)))))
    return n_images * (1 - miss)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def windows_for_budgets(path: Path, budgets: list[str], d: int, batch_size: int) -> dict[int, str]:
    """{window tokens: budget} of a reader given `memory=budget` on a d-wide fp16 store of 16-image
    chunks (an empty store: only its shape matters)."""
    from activation_store.readers import ReaderConfig
    from activation_store.readers.engine import window_plan
    from activation_store.readers.selection import TokenSelection

    store = ActivationStore.create(str(path), locations="resid_0", n_tokens=257, d_model=d,
                                   config=StoreConfig(chunk_images=16, region_images=1024))
    sel = TokenSelection.resolve("all", 257)
    return {window_plan(ReaderConfig(location="resid_0", memory=b, batch_size=batch_size), store, sel)["window_tokens"]: b
            for b in budgets}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--buffers", default="4112,16448,65792,263168,1052672")
    ap.add_argument("--memory", default=None, help="memory budgets (comma list, like 256MB,1GB) instead of --buffers")
    ap.add_argument("--memory-d-model", type=int, default=1024, help="d_model the budgets are sized for")
    ap.add_argument("--out", "--json", dest="out", default="benchmarks/results/shuffle_quality.json")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="shuffle_q_"))
    try:
        store = ActivationStore.create(str(work / "s"), locations="resid_0", n_tokens=257, d_model=4,
                                       config=StoreConfig(chunk_images=16, region_images=1024))
        store.plan_shards([("s", args.images)])
        with store.writer("s", compute_stats=False) as w:
            for i in range(0, args.images, 256):
                n = min(256, args.images - i)
                w.add({"resid_0": np.ones((n, 257, 4), np.float16)}, [ImageRecord(str(i + j)) for j in range(n)])
        expect = expected_distinct(args.images, 257, 256)
        rows = []
        budgets = {}
        if args.memory:
            budgets = windows_for_budgets(work / "sizing", args.memory.split(","), args.memory_d_model, args.batch_size)
            buffers = list(budgets)
        else:
            buffers = [int(x) for x in args.buffers.split(",")]
        for buf in buffers:
            reader = ShuffledReader(store, "resid_0", batch_size=args.batch_size, buffer_tokens=buf, seed=0,
                                    return_ids=True, drop_last=True)
            shares, mixing, means = [], [], []
            for _, ids in reader:
                img = ids[:, 0].numpy()
                shares.append(np.bincount(img - img.min()).max() / len(img))
                mixing.append(len(np.unique(img[:256])) / expect)
                means.append(img.mean())
            rows.append({**({"memory": budgets[buf]} if buf in budgets else {}),
                         "buffer_tokens": buf, "buffer_images": buf / 257, "max_share_mean": float(np.mean(shares)),
                         "max_share_worst": float(np.max(shares)), "mixing": float(np.mean(mixing)),
                         "order_correlation": spearman(np.arange(len(means)), np.asarray(means))})
        print((f"{'memory':>8} " if budgets else "") + f"{'buffer tokens':>13} {'~images':>8} {'max share (mean)':>16} "
              f"{'max share (worst)':>17} {'mixing':>7} {'order corr':>10}")
        for r in rows:
            print((f"{r['memory']:>8} " if budgets else "") + f"{r['buffer_tokens']:>13,} {r['buffer_images']:>8.0f} "
                  f"{r['max_share_mean']:>16.4f} "
                  f"{r['max_share_worst']:>17.4f} {r['mixing']:>7.3f} {r['order_correlation']:>10.3f}")
        print(f"\n{args.images} images x 257 tokens, batch {args.batch_size}; uniform sampling: max share ~"
              f"{3 / args.batch_size:.4f}, mixing 1.0, order correlation ~0"
              + (f"; windows sized by each memory budget for d_model {args.memory_d_model} fp16" if budgets else ""))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"images": args.images, "batch_size": args.batch_size, "results": rows},
                                             indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
