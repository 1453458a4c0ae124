"""SAE training speed: tokens/s of our training step (sparse decode with embedding_bag, AuxK,
decoder renormalisation) beside a plain dense-PyTorch TopK step (dense latent, dense decode, no
AuxK), same sizes, same device, same run. Data: random batches already on the device, so this
measures the SAE step alone (the readers are measured by read_throughput.py).

    python benchmarks/sae_train.py                               # CPU: small sizes
    python benchmarks/sae_train.py --device cuda --d-in 1024 --latents 16384,65536 --batch-size 4096
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from activation_store.sae import metrics
from activation_store.sae.model import TopKSAE
from activation_store.sae.trainer import TrainingStep, sae_step


def dense_baseline_step(params, opt, x, k):
    w_enc, b_enc, w_dec, b_dec = params
    pre = (x - b_dec) @ w_enc + b_enc
    vals, idx = pre.topk(k, dim=-1)
    latent = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    x_hat = latent @ w_dec + b_dec
    loss = (x - x_hat).pow(2).sum(-1).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def our_step(step, opt, x, dead, dead_mask):
    """The trainer's own step; `dead_mask` is fixed so that AuxK costs what it costs in a run with
    that many dead latents (on random data few would die within a short benchmark)."""
    sae_step(step, opt, x, dead, aux_dead=dead_mask)


def rate(step, x, steps, sync) -> float:
    step(x)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x)
    sync()
    return steps * x.shape[0] / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d-in", type=int, default=256)
    ap.add_argument("--latents", default="4096,16384")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dead-fraction", type=float, default=0.1, help="share of latents AuxK treats as dead")
    ap.add_argument("--out", default="benchmarks/results/sae_train.json")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, args.d_in, device=dev)
    rows = []
    for n in (int(v) for v in args.latents.split(",")):
        sae = TopKSAE(args.d_in, n, args.k, seed=0).to(dev)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
        dead = metrics.DeadLatents(n, window=10 * args.batch_size, device=dev)
        dead_mask = torch.rand(n, generator=torch.Generator().manual_seed(1)).to(dev) < args.dead_fraction
        step = TrainingStep(sae, args.d_in // 2, 1 / 32)
        ours = rate(lambda b: our_step(step, opt, b, dead, dead_mask), x, args.steps, sync)
        params = [p.detach().clone().requires_grad_(True) for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
        bopt = torch.optim.Adam(params, lr=1e-4)
        base = rate(lambda b: dense_baseline_step(params, bopt, b, args.k), x, args.steps, sync)
        rows.append({"d_in": args.d_in, "latents": n, "k": args.k, "batch": args.batch_size, "device": args.device,
                     "dead_fraction": args.dead_fraction, "ours_tokens_s": ours, "dense_baseline_tokens_s": base,
                     "ratio": ours / base})
    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"{len(os.sched_getaffinity(0))} CPU cores"
    print(f"{'d_in':>5} {'latents':>8} {'k':>3} {'batch':>6} {'ours tok/s':>11} {'dense tok/s':>12} {'ratio':>6}")
    for r in rows:
        print(f"{r['d_in']:>5} {r['latents']:>8} {r['k']:>3} {r['batch']:>6} {r['ours_tokens_s']:>11,.0f} "
              f"{r['dense_baseline_tokens_s']:>12,.0f} {r['ratio']:>6.2f}")
    print(f"\n({name}; ours includes AuxK over {args.dead_fraction:.0%} dead latents and decoder renormalisation, "
          "the baseline does neither)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": {"device": name, "platform": platform.platform()}, "results": rows},
                                         indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
