"""Does the store keep up with the trainer? Tokens/s of `actstore train` end to end (shuffled reads
from a store on disk, normalisation, the SAE step, AuxK, checkpoints off) beside the bare SAE
step on a batch already on the device and the shuffled reader alone, same sizes, same run (AuxK
idle in both: sae_train.py measures its cost).
A ratio near 1 means reading costs the trainer nothing.

    python benchmarks/train_end_to_end.py                       # CPU: d 256, 4K latents
    python benchmarks/train_end_to_end.py --device cuda --d-model 1024 --latents 65536 \\
        --batch-size 4096 --images 4096 --tokens 10000000
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from activation_store import ShuffledReader
from activation_store.sae import metrics
from activation_store.sae.model import TopKSAE
from activation_store.sae.trainer import TrainerConfig, TrainingStep, train
from read_throughput import LOC, build_store
from sae_train import our_step, rate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--latents", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=150_000, help="tokens the trainer runs for")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default="benchmarks/results/train_end_to_end.json")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="e2e-"))
    store = build_store(work / "store.zarr", args.images, args.d_model, "none", stats=True)

    # the reader alone, delivering normalised float32 batches onto the device
    reader = ShuffledReader(store, LOC, batch_size=args.batch_size, epochs=None, device=args.device,
                            normalize="unit_mean_sq_norm", drop_last=True)
    it = iter(reader)
    # real batches, kept for the bare step (top-k and gathers depend on the data)
    resident = [next(it).clone() for _ in range(8)]
    sync()
    t0, n = time.perf_counter(), 0
    while n < args.tokens:
        n += next(it).shape[0]
    sync()
    reader_rate = n / (time.perf_counter() - t0)
    reader.close()

    # the bare step on one resident batch; AuxK idle here and in the trainer (no latent is silent
    # for its window), so both do the same work and the difference is the reading
    cfg = TrainerConfig(store=str(work / "store.zarr"), out=str(work / "run"), total_tokens=args.tokens,
                        warmup_tokens=0, checkpoint_every_tokens=10**15, log_every_steps=10**9, dead_tokens=10**15,
                        reader={"location": LOC, "batch_size": args.batch_size, "device": args.device},
                        sae={"n_latents": args.latents, "k": args.k})
    sae = TopKSAE(args.d_model, args.latents, args.k, seed=0).to(dev)
    sae.init_b_dec_(resident[0])  # as the trainer does
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.learning_rate())
    dead = metrics.DeadLatents(args.latents, device=dev)
    mask = torch.zeros(args.latents, dtype=torch.bool, device=dev)
    steps = args.tokens // args.batch_size  # as many as the trainer takes: early steps cost more
    batches = itertools.cycle(resident)
    step = TrainingStep(sae, args.d_model // 2, cfg.auxk_coef)
    step_rate = rate(lambda _: our_step(step, opt, next(batches), dead, mask), resident[0], steps, sync)

    # the trainer end to end; its own clock starts at the first batch
    result = train(cfg)
    train_rate = result["last"]["tokens_per_s"]

    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"{len(os.sched_getaffinity(0))} CPU cores"
    row = {"d_model": args.d_model, "latents": args.latents, "k": args.k, "batch": args.batch_size,
           "device": args.device, "reader_tokens_s": reader_rate, "bare_step_tokens_s": step_rate,
           "trainer_tokens_s": train_rate, "trainer_vs_bare_step": train_rate / step_rate,
           "reader_vs_bare_step": reader_rate / step_rate}
    print(f"{'d':>5} {'latents':>8} {'batch':>6} {'reader tok/s':>13} {'bare step tok/s':>16} {'trainer tok/s':>14} "
          f"{'trainer/step':>12} {'reader/step':>11}")
    print(f"{args.d_model:>5} {args.latents:>8} {args.batch_size:>6} {reader_rate:>13,.0f} {step_rate:>16,.0f} "
          f"{train_rate:>14,.0f} {row['trainer_vs_bare_step']:>12.2f} {row['reader_vs_bare_step']:>11.1f}")
    print(f"\n({name}; store of {args.images} images x 257 tokens, fp16, codec none, in {work})")

    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": {"device": name, "platform": platform.platform()},
                                          "results": [row]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
