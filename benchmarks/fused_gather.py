"""The readers' fused gather (one compiled pass: gather, decode, normalise, convert) against the
same work done with torch ops block by block (the readers' previous path: rows gathered into a
scratch of ~128 rows that stays in L2, then widened, shifted, masked, converted, multiplied and
normalised in place, each op a pass over the block), same rows, same output buffers, same run.
Both produce the same bits (checked here for every case; tests/test_fused_gather.py is the spec).

    python benchmarks/fused_gather.py                       # d 1024, 4,096-row batches, 1 thread
    python benchmarks/fused_gather.py --window-rows 524288  # the default window (1 GB at fp16)
    python benchmarks/fused_gather.py --json out.json

ns per value delivered (lower is better), best of `--repeats`; "speed-up" = torch / fused. The
window is larger than the L3 cache by default, as a reader's is, so rows come from memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from activation_store.readers import fused_gather

BLOCK_ROWS = 128  # the torch path's block: 128 x 1024 values, inside a core's L2


def torch_blocks(src: torch.Tensor, scales: torch.Tensor | None, idx: torch.Tensor, out: torch.Tensor,
                 shift: torch.Tensor | None, scale: torch.Tensor | None, storage: str) -> None:
    d = src.shape[1]
    raw = torch.empty((BLOCK_ROWS, d), dtype=src.dtype)
    f32 = torch.empty((BLOCK_ROWS, d), dtype=torch.float32)
    sc = torch.empty((BLOCK_ROWS, 1), dtype=torch.float32)
    wide = torch.empty((BLOCK_ROWS, d), dtype=torch.int16)
    direct = out.dtype == torch.float32
    for s in range(0, len(idx), BLOCK_ROWS):
        e = min(s + BLOCK_ROWS, len(idx))
        dst = out[s:e] if direct else f32[:e - s]
        block = raw[:e - s]
        torch.index_select(src, 0, idx[s:e], out=block)
        if storage == "fp8":
            torch.index_select(scales, 0, idx[s:e], out=sc[:e - s, 0])
            bits = wide[:e - s]
            bits.copy_(block.view(torch.int8))
            bits.bitwise_left_shift_(7).bitwise_and_(fused_gather.FP8_MASK)
            dst.copy_(bits.view(torch.float16))
            dst.mul_(sc[:e - s].mul_(256.0))
        elif storage == "bf16":
            dst.copy_(block.view(torch.bfloat16))
        else:
            dst.copy_(block)
        if shift is not None:
            dst.sub_(shift).mul_(scale)
        if not direct:
            out[s:e].copy_(dst)


def case(storage: str, out_dtype: str, normalise: bool, window_rows: int, batch: int, d: int, repeats: int,
         rng) -> dict:
    if storage == "fp8":
        codes = rng.integers(0, 256, (window_rows, d), dtype=np.uint8)
        codes[codes & 0x7F == 0x7F] = 0
        src_np, src_t = codes.view(np.int8), torch.from_numpy(codes)
    else:
        x = rng.standard_normal((window_rows, d), dtype=np.float32).astype(np.float16)
        src_t = torch.from_numpy(x) if storage == "fp16" else torch.from_numpy(x).to(torch.bfloat16).view(torch.int16)
        src_np = src_t.view(torch.int16).numpy().view(fused_gather.SOURCE_VIEW[storage])
    scales = rng.random(window_rows, dtype=np.float32) + 0.5
    idx = rng.integers(0, window_rows, batch).astype(np.int64)
    shift = rng.standard_normal(d).astype(np.float32)
    scale = (rng.random(d) + 0.5).astype(np.float32)
    tdt = {"float32": torch.float32, "float16": torch.float16}[out_dtype]
    out_fused, out_torch = torch.empty((batch, d), dtype=tdt), torch.empty((batch, d), dtype=tdt)
    dst = out_fused.numpy() if tdt == torch.float32 else out_fused.view(torch.int16).numpy()
    n_shift = shift if normalise else np.zeros(d, np.float32)
    n_scale = scale if normalise else np.ones(d, np.float32)
    ts, ti = torch.from_numpy(shift), torch.from_numpy(idx)
    runs = {
        "fused": lambda: fused_gather.gather_rows(src_np, idx, scales, n_shift, n_scale, normalise, dst),
        "torch": lambda: torch_blocks(src_t, torch.from_numpy(scales), ti, out_torch, ts if normalise else None,
                                      torch.from_numpy(scale), storage),
    }
    best = {k: float("inf") for k in runs}
    for f in runs.values():
        f()  # compile / first touch
    for _ in range(repeats):  # interleaved
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t0)
    same = torch.equal(out_fused.view(torch.int16 if tdt != torch.float32 else torch.int32),
                       out_torch.view(torch.int16 if tdt != torch.float32 else torch.int32))
    values = batch * d
    return {"storage": storage, "out": out_dtype, "normalise": normalise,
            "fused_ns_per_value": best["fused"] / values * 1e9, "torch_ns_per_value": best["torch"] / values * 1e9,
            "speedup": best["torch"] / best["fused"], "same_bits": bool(same)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--window-rows", type=int, default=1 << 17, help="rows the batch is drawn from (default: 256 MB at fp16)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", default="benchmarks/results/fused_gather.json")
    a = p.parse_args()
    torch.set_num_threads(1)  # as the readers' gather threads run
    rng = np.random.default_rng(0)
    cases = [("fp16", "float32", False), ("fp16", "float32", True), ("bf16", "float32", False),
             ("fp8", "float32", False), ("fp8", "float16", False), ("fp8", "float32", True)]
    rows = []
    print(f"{'storage':8} {'out':8} {'normalised':10} {'fused ns/value':>15} {'torch ns/value':>15} {'speed-up':>9} same bits")
    for storage, out, norm in cases:
        r = case(storage, out, norm, a.window_rows, a.batch_size, a.d_model, a.repeats, rng)
        rows.append(r)
        print(f"{storage:8} {out:8} {str(norm):10} {r['fused_ns_per_value']:15.3f} {r['torch_ns_per_value']:15.3f} "
              f"{r['speedup']:9.2f} {r['same_bits']}")
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "load": os.getloadavg(), "args": vars(a)}
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"meta": meta, "cases": rows}, f, indent=1)
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
