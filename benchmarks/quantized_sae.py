"""One byte per value: which 8-bit scheme, and what it costs an SAE.

Part 1, the schemes (on synthetic ViT-like activations, `activation_store.synthetic`): float8 e4m3
with one float32 scale per token (the format's fp8), float8 e5m2 with one scale per token, int8 with
a per-token absmax scale, int8 with per-channel scales from the store's statistics (absmax per
channel). Columns: relative RMS error ||x' - x|| / ||x||, max relative error over values at least
1% of their token's max |x| (smaller ones are noise-level for every scheme), the noise as a
fraction of the total variance, that noise as a fraction of the ~30% variance a CLIP-Scope-quality
SAE leaves unexplained, and encode/decode rates (numpy, and torch where it has the type).

Part 2, the SAE cost of the chosen scheme: the same SAE (seed, tokens, hyperparameters) trained on
an fp16 store and on its fp8 conversion (`actstore convert`), both evaluated on the fp16 store's
held-out tokens (the same images: conversion keeps rows, the split hashes rows). Datasets: (a)
synthetic ViT-like activations, (b) a random-weight open_clip ViT (tests/data/tiny-vit-14.json,
257 tokens x 64) harvested from the bundled photos plus generated images, (c) a planted dictionary
(recovery: mean over true features of the best cosine with a decoder row).

    python benchmarks/quantized_sae.py --quick     # small stores: ~15 minutes on 2 loaded cores
    python benchmarks/quantized_sae.py --train-scale 0.25   # full-size stores, 1/4 of the training: ~20 minutes
    python benchmarks/quantized_sae.py             # full-size stores and training (~4x that)
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

from activation_store.store import ActivationStore, ImageRecord, StoreConfig, open_store
from activation_store.store.audit import info
from activation_store.store.convert import ConvertConfig, convert
from activation_store.store.encoding import dequantize_fp8, quantize_fp8
from activation_store.synthetic import synthetic_activations

ROOT = Path(__file__).resolve().parent.parent
LOC = "resid_0"


# ----------------------------------------------------------------------------- part 1: schemes
def _timed(fn, values: int, repeat: int = 3) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return values * repeat / (time.perf_counter() - t) / 1e6  # M values/s


def _float8(x: torch.Tensor, kind, fmax: float):
    scale = x.abs().amax(-1, keepdim=True) / fmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (x / scale).to(kind), scale


def schemes(x: np.ndarray) -> list[dict]:
    """x: (images, tokens, d) float32."""
    xt = torch.from_numpy(x)
    ch_absmax = np.abs(x).reshape(-1, x.shape[-1]).max(0)  # the store's statistics: absmax per channel
    ch_scale = np.where(ch_absmax > 0, ch_absmax / 127, 1).astype(np.float32)
    rows = []

    def add(name, stored, enc_np, dec_np, enc_t=None, dec_t=None):
        err = stored.astype(np.float64) - x
        token_max = np.abs(x).max(-1, keepdims=True)
        big = np.abs(x) >= 0.01 * token_max
        var = x.reshape(-1, x.shape[-1]).astype(np.float64).var(0).sum() * (x.size // x.shape[-1])
        noise = float((err ** 2).sum())
        rows.append({
            "scheme": name,
            "relative_rms": float(np.sqrt(noise / (x.astype(np.float64) ** 2).sum())),
            "max_rel_over_1pct": float((np.abs(err)[big] / np.abs(x)[big]).max()),
            "noise_over_variance": noise / var,
            "noise_over_sae_residual": noise / var / 0.30,
            "encode_numpy_mvals": _timed(enc_np, x.size),
            "decode_numpy_mvals": _timed(dec_np, x.size),
            "encode_torch_mvals": _timed(enc_t, x.size) if enc_t else None,
            "decode_torch_mvals": _timed(dec_t, x.size) if dec_t else None,
        })

    codes, scales = quantize_fp8(x)
    out = np.empty(x.shape, np.float32)
    from activation_store.harvest.quantize import dequantize_fp8 as tdeq
    from activation_store.harvest.quantize import quantize_fp8 as tq
    tc, ts = tq(xt)
    add("fp8 e4m3, scale per token (chosen)", dequantize_fp8(codes, scales),
        lambda: quantize_fp8(x), lambda: dequantize_fp8(codes, scales, out), lambda: tq(xt), lambda: tdeq(tc, ts))
    e5, s5 = _float8(xt, torch.float8_e5m2, 57344.0)
    add("fp8 e5m2, scale per token", (e5.float() * s5).numpy(), lambda: None, lambda: None,
        lambda: _float8(xt, torch.float8_e5m2, 57344.0), lambda: e5.float() * s5)
    rows[-1]["encode_numpy_mvals"] = rows[-1]["decode_numpy_mvals"] = None  # numpy has no e5m2 (ml_dtypes would)

    def int8_token():
        s = np.abs(x).max(-1, keepdims=True) / np.float32(127)
        s = np.where(s > 0, s, 1).astype(np.float32)
        return np.rint(x / s).astype(np.int8), s
    q, s = int8_token()
    add("int8, absmax per token", q * s, int8_token, lambda: np.multiply(q, s, out=out, casting="unsafe"),
        lambda: torch.round(xt / (xt.abs().amax(-1, keepdim=True) / 127)).to(torch.int8),
        lambda: torch.from_numpy(q).float() * torch.from_numpy(s))

    def int8_channel():
        return np.clip(np.rint(x / ch_scale), -127, 127).astype(np.int8)
    qc = int8_channel()
    add("int8, scale per channel (store statistics)", qc * ch_scale, int8_channel,
        lambda: np.multiply(qc, ch_scale, out=out, casting="unsafe"))
    return rows


# ----------------------------------------------------------------------------- part 2: SAE cost
def rows_store(path: Path, x: np.ndarray, chunk_images: int = 16) -> ActivationStore:
    """An fp16 store of (images, tokens, d) activations at location resid_0."""
    n, t, d = x.shape
    store = ActivationStore.create(str(path), locations=LOC, n_tokens=t, d_model=d,
                                   config=StoreConfig(dtype="fp16", chunk_images=chunk_images,
                                                      region_images=chunk_images * 16))
    per = chunk_images * 16
    store.plan_shards([(f"s{i}", min(per, n - i)) for i in range(0, n, per)])
    for i in range(0, n, per):
        with store.writer(f"s{i}") as w:
            w.add({LOC: x[i:i + per].astype(np.float16)}, [ImageRecord(f"{j}") for j in range(i, min(i + per, n))])
    return open_store(str(path))


def planted(n_tokens_total: int, d: int = 64, n_features: int = 512, k: int = 4, tokens: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n_features, d))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    idx = np.argsort(rng.random((n_tokens_total, n_features)), axis=1)[:, :k]
    x = np.einsum("nk,nkd->nd", rng.uniform(0.5, 1.5, (n_tokens_total, k)), feats[idx])
    x += 0.01 * rng.standard_normal((n_tokens_total, d))
    return x[: n_tokens_total // tokens * tokens].reshape(-1, tokens, d).astype(np.float32), feats


def harvested_tiny_vit(work: Path, n_generated: int) -> Path:
    """A random-weight tiny ViT (257 tokens x 64, tests/data/tiny-vit-14.json) over the bundled
    photos and generated images (noise, gradients, stripes), harvested into an fp16 store."""
    from PIL import Image

    from activation_store.harvest.config import HarvestConfig
    from activation_store.harvest.model import ModelConfig
    from activation_store.harvest.run import harvest

    folder = work / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for p in (ROOT / "activation_store" / "sample_images").glob("*.jpg"):
        shutil.copy(p, folder / p.name)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:224, 0:224]
    for i in range(n_generated):
        kind = i % 3
        if kind == 0:
            arr = rng.integers(0, 255, (224, 224, 3))
        elif kind == 1:
            arr = np.stack([(xx * rng.uniform(0.5, 2) + yy * rng.uniform(0.5, 2) + rng.uniform(0, 255)) % 255] * 3, -1)
        else:
            f = rng.uniform(0.02, 0.3)
            arr = (127 + 127 * np.sin(f * xx + rng.uniform(0, 6))[..., None] * rng.uniform(0, 1, 3))
        Image.fromarray(arr.astype(np.uint8)).save(folder / f"gen{i:04d}.jpg", quality=90)
    out = work / "tiny.zarr"
    cfg = HarvestConfig(out=str(out), images=str(folder), layers=[3], batch_size=16, workers=0, shard_size=256,
                        progress=False, report=str(work / "harvest.json"),
                        model=ModelConfig(model=str(ROOT / "tests" / "data" / "tiny-vit-14.json"), pretrained="none"))
    cfg.store.chunk_images, cfg.store.region_images = 16, 256
    harvest(cfg)
    return out


def train_and_eval(store_url: str, eval_url: str, location: str, run: Path, sae: dict, tokens: int, holdout: float,
                   feats: np.ndarray | None) -> dict:
    from activation_store import ShuffledReader
    from activation_store.sae import load_sae
    from activation_store.sae.trainer import TrainerConfig, train

    shutil.rmtree(run, ignore_errors=True)
    t = time.perf_counter()
    result = train(TrainerConfig(
        store=store_url, out=str(run), total_tokens=tokens, lr=2e-3, warmup_tokens=tokens // 50,
        dead_tokens=max(10_000, tokens // 10), checkpoint_every_tokens=10**12,
        reader={"location": location, "batch_size": 256, "normalize": "unit_mean_sq_norm", "buffer_tokens": 16384,
                "threads": 2, "holdout": holdout, "seed": 0},
        sae=sae))
    train_s = time.perf_counter() - t
    model = load_sae(result["checkpoint"])  # raw activations in, the normaliser folded in
    held = []
    for x in ShuffledReader(eval_url, location, batch_size=4096, split="eval", holdout=holdout, epochs=1, seed=0):
        held.append(x.double())
    x = torch.cat(held)
    with torch.no_grad():
        x_hat = model(x.float()).double()
    err = float((x - x_hat).pow(2).sum())
    tot = float((x - x.mean(0)).pow(2).sum())
    sq = float(x.pow(2).sum())
    out = {"explained_variance": 1 - err / tot, "nmse": err / sq, "eval_tokens": len(x),
           "dead_fraction": result["last"].get("dead_proportion"), "l0": result["last"].get("l0"), "train_s": train_s}
    if feats is not None:
        w = model.W_dec.detach().double().numpy()
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        out["recovery_cosine"] = float((feats @ w.T).max(axis=1).mean())
    return out


def sae_cost(name: str, fp16_url: str, work: Path, location: str, sae: dict, tokens: int, feats=None) -> dict:
    fp8_url = str(work / f"{name}-fp8.zarr")
    shutil.rmtree(fp8_url, ignore_errors=True)
    convert(ConvertConfig(src=fp16_url, dst=fp8_url, store_dtype="fp8", progress=False))
    i16, i8 = info(open_store(fp16_url)), info(open_store(fp8_url))
    res = {"dataset": name, "images": i16["images"], "tokens_per_image": i16["n_tokens"], "d_model": i16["d_model"],
           "bytes_per_value_fp16": i16["per_location"][location]["bytes_per_value"],
           "bytes_per_value_fp8": i8["per_location"][location]["bytes_per_value"],
           "fp8_error": i8["per_location"][location]["lossy_error"], "sae": sae, "train_tokens": tokens}
    for dtype, url in (("fp16", fp16_url), ("fp8", fp8_url)):
        res[dtype] = train_and_eval(url, fp16_url, location, work / f"{name}-{dtype}-run", sae, tokens, 0.2, feats)
    res["ev_difference"] = res["fp8"]["explained_variance"] - res["fp16"]["explained_variance"]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small stores and short training (a few minutes)")
    ap.add_argument("--schemes-only", action="store_true", help="part 1 only")
    ap.add_argument("--train-scale", type=float, default=1.0,
                    help="multiply the default mode's training tokens (stores keep their default size): "
                         "0.25 fits a loaded 2-core machine in about 25 minutes")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "quantized_sae.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="quantized-sae-", dir=args.workdir))
    results = {"machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "load_before": os.getloadavg()},
               "quick": args.quick, "train_scale": 1.0 if args.quick else args.train_scale}
    t_start = time.perf_counter()

    def tokens(quick: int, full: int) -> int:
        return quick if args.quick else int(full * args.train_scale)
    try:
        x = synthetic_activations(7, 16 if args.quick else 64, 257, 1024)
        results["schemes"] = schemes(x)
        print(f"\n8-bit schemes on synthetic ViT-like activations ({x.shape[0]} images x 257 x 1024)")
        print(f"{'scheme':<44} {'rel RMS':>8} {'max rel':>8} {'noise/var':>9} {'/SAE res':>8} "
              f"{'enc np':>7} {'dec np':>7} {'enc t':>7} {'dec t':>7}  (M values/s)")
        fmt = lambda v: f"{v:7.0f}" if v is not None else f"{'-':>7}"  # noqa: E731
        for r in results["schemes"]:
            print(f"{r['scheme']:<44} {r['relative_rms']:8.4f} {r['max_rel_over_1pct']:8.4f} {r['noise_over_variance']:9.2e} "
                  f"{r['noise_over_sae_residual']:8.2e} {fmt(r['encode_numpy_mvals'])} {fmt(r['decode_numpy_mvals'])} "
                  f"{fmt(r['encode_torch_mvals'])} {fmt(r['decode_torch_mvals'])}")
        if not args.schemes_only:
            q = args.quick
            cost = []
            n = 256 if q else 1024
            a = rows_store(work / "synthetic.zarr", synthetic_activations(3, n, 65, 256))
            cost.append(sae_cost("synthetic (65 tok x 256)", a.url, work, LOC, {"n_latents": 2048, "k": 32},
                                 tokens(200_000, 1_000_000)))
            tiny = harvested_tiny_vit(work, 240 if q else 1000)
            cost.append(sae_cost("tiny ViT, random weights (257 x 64)", str(tiny), work, "resid_3",
                                 {"n_latents": 512, "k": 16}, tokens(200_000, 1_000_000)))
            px, feats = planted(65_536 if q else 262_144)
            p = rows_store(work / "planted.zarr", px, chunk_images=64)
            cost.append(sae_cost("planted dictionary (d 64, 512 features, k 4)", p.url, work, LOC,
                                 {"n_latents": 512, "k": 4}, tokens(300_000, 1_200_000), feats))
            results["sae_cost"] = cost
            print(f"\nSAE trained on fp16 vs on its fp8 conversion, evaluated on the fp16 held-out tokens")
            print(f"{'dataset':<46} {'images':>6} {'B/val fp8':>9} {'EV fp16':>8} {'EV fp8':>8} {'dEV':>8} "
                  f"{'NMSE fp16':>9} {'NMSE fp8':>9} {'dead16':>7} {'dead8':>7} {'cos16':>6} {'cos8':>6}")
            for r in cost:
                a16, a8 = r["fp16"], r["fp8"]
                cos = (f"{a16['recovery_cosine']:6.3f} {a8['recovery_cosine']:6.3f}" if "recovery_cosine" in a16
                       else f"{'-':>6} {'-':>6}")
                print(f"{r['dataset']:<46} {r['images']:>6} {r['bytes_per_value_fp8']:9.4f} "
                      f"{a16['explained_variance']:8.4f} {a8['explained_variance']:8.4f} {r['ev_difference']:+8.4f} "
                      f"{a16['nmse']:9.4f} {a8['nmse']:9.4f} {a16['dead_fraction'] or 0:7.4f} {a8['dead_fraction'] or 0:7.4f} {cos}")
        results["machine"]["load_after"] = os.getloadavg()
        results["wall_s"] = time.perf_counter() - t_start
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
