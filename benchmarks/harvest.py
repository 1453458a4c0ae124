"""Harvest throughput against a bare forward pass of the same model, batch and device, measured in
the same run: images/s of the full harvest (decode, forward, every requested layer cast, copied,
written and committed) divided by images/s of the forward alone (stopping after the deepest
requested block, as the harvest does, on pixels already preprocessed and on the device).

    python benchmarks/harvest.py                                  # CPU, a ViT-S/14-sized model
    python benchmarks/harvest.py --model ViT-L-14 --device cuda --dtype bf16 --batch-size 128 --images 2048
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from activation_store.harvest.config import HarvestConfig
from activation_store.harvest.model import LoadedViT, ModelConfig, preprocess_pil
from activation_store.harvest.run import harvest

HERE = Path(__file__).parent


def make_photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Smooth synthetic 'photos' (gradients + blobs + mild noise) that decode like real JPEGs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:320, 0:400] / 320.0
    paths = []
    for i in range(n):
        img = np.zeros((320, 400, 3), np.float32)
        for c in range(3):
            a, b, p = rng.uniform(-1, 1, 3)
            img[..., c] = 0.5 + 0.25 * np.sin(6 * (a * xx + b * yy) + p)
        for _ in range(4):
            cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1.25), rng.uniform(0.05, 0.2)
            img[((yy - cy) ** 2 + (xx - cx) ** 2) < r * r] = rng.uniform(0, 1, 3)
        img += rng.normal(0, 0.02, img.shape)
        path = folder / f"{i:06d}.jpg"
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def bare_forward_rate(vit: LoadedViT, paths: list[Path], batch: int, repeats: int) -> float:
    pixels = torch.from_numpy(np.stack([preprocess_pil(vit.transform, Image.open(p)) for p in paths]))
    pixels = pixels.to(vit.device)
    sync = torch.cuda.synchronize if vit.device.type == "cuda" else (lambda: None)
    vit.forward(vit.normalize(pixels[:batch]), None)  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, len(paths) - batch + 1, batch):
            vit.forward(vit.normalize(pixels[i:i + batch]), None)
        sync()
        best = min(best, time.perf_counter() - t0)
    return (len(paths) // batch * batch) / best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(HERE / "models" / "bench-vit-s-14.json"))
    ap.add_argument("--pretrained", default="none", help="speed does not depend on the weights")
    ap.add_argument("--layers", default="2,5,8,11", help="blocks to store (ViT-L-14: 2,5,8,11,14,17,20,22)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", help="compute dtype")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--workers", type=int, default=1, help="decode processes")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--store-dtype", default="fp16", help="storage dtype (fp8: quantised on the device)")
    ap.add_argument("--cuda-graph", action="store_true", help="HarvestConfig.cuda_graph: full batches replayed from "
                    "a captured CUDA graph")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default="benchmarks/results/harvest.json")
    ap.add_argument("--profile", action="store_true", help="cProfile the harvest's main thread (top 25 by own time)")
    args = ap.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="harvest_bench_"))
    try:
        paths = make_photos(work / "photos", args.images)
        mcfg = ModelConfig(model=args.model, pretrained=args.pretrained, device=args.device, compute_dtype=args.dtype)
        layers = [int(x) for x in args.layers.split(",")]
        vit = LoadedViT(mcfg, layers)
        bare = bare_forward_rate(vit, paths, args.batch_size, args.repeats)
        del vit
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        runs = []
        for r in range(args.repeats):
            store = work / f"store{r}.zarr"
            shutil.rmtree(store, ignore_errors=True)
            cfg = HarvestConfig(out=str(store), images=str(work / "photos"), layers=layers, model=mcfg,
                                batch_size=args.batch_size, workers=args.workers, shard_size=len(paths),
                                progress=False, report=str(work / f"report{r}.json"), cuda_graph=args.cuda_graph)
            cfg.store.dtype = args.store_dtype
            if args.profile:
                import cProfile
                import pstats

                prof = cProfile.Profile()
                rep = prof.runcall(harvest, cfg)
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            else:
                rep = harvest(cfg)
            runs.append(rep)
            shutil.rmtree(store, ignore_errors=True)
        best = max(runs, key=lambda x: x["images_per_s"])
        full = best["images_per_s"]
        steady = best["steady_images_per_s"] or full
        gb = best["bytes_written"] / best["seconds"]["harvest"] / 1e9
        # the raw write ceiling of the same bytes, same threads, same file system, this run
        # (harvest_pipeline.py's): the harvest's limit is the lower of the forward and the storage
        from harvest_pipeline import ceiling_source, write_ceiling

        per_image = best["bytes_written"] / max(1, best["images"]["stored"])
        threads = min(len(layers), len(os.sched_getaffinity(0)) * 2)
        chunk_bytes = int(per_image * 16)
        source = ceiling_source(int(per_image * args.batch_size))
        ceiling_s = min(write_ceiling(work, best["bytes_written"], chunk_bytes, threads, source) for _ in range(2))
        ceiling = best["images"]["stored"] / ceiling_s
        del source
        row = {
            "model": Path(args.model).stem, "device": args.device, "dtype": args.dtype, "batch": args.batch_size,
            "layers": layers, "images": len(paths), "decode_workers": args.workers,
            "bare_forward_img_s": bare, "harvest_img_s": full, "ratio": full / bare, "written_gb_s": gb,
            "harvest_steady_img_s": steady, "steady_ratio": steady / bare, "seconds": best["seconds"],
            "store_dtype": args.store_dtype, "write_ceiling_img_s": ceiling,
            "ratio_to_min_forward_ceiling": full / min(bare, ceiling), "cuda_graph": args.cuda_graph,
        }
        dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
        print(f"{'model':<16} {'device':<8} {'dtype':<5} {'store':<5} {'batch':>5} {'layers':>6} {'bare img/s':>10} "
              f"{'ceiling img/s':>13} {'harvest img/s':>13} {'ratio':>6} {'/min':>6} {'steady img/s':>12} "
              f"{'GB/s written':>12}")
        print(f"{row['model'] + (' +graph' if args.cuda_graph else ''):<16} {args.device:<8} {args.dtype:<5} {args.store_dtype:<5} {args.batch_size:>5} "
              f"{len(layers):>6} {bare:>10.1f} {ceiling:>13.1f} {full:>13.1f} {row['ratio']:>6.2f} "
              f"{row['ratio_to_min_forward_ceiling']:>6.2f} {steady:>12.1f} {gb:>12.3f}")
        print("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in best["seconds"].items()))
        print(f"\n(device: {dev}; {len(os.sched_getaffinity(0))} CPUs; ratio = harvest / bare forward, /min = harvest / "
              f"min(bare forward, write ceiling), same run; steady = after the first batch)")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"machine": {"device": dev, "cpus": len(os.sched_getaffinity(0)),
                                                          "platform": platform.platform()}, "result": row}, indent=2))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
