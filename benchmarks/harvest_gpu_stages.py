"""Device time per batch of each harvest stage on the GPU, cumulatively: bare forward; + hooks
copying every location into the storage-dtype buffer; + device statistics; + the copy into
pinned host memory. Tells whether the device or the host limits a harvest.

    python benchmarks/harvest_gpu_stages.py --model ViT-L-14 --batch-size 128
"""

from __future__ import annotations

import argparse
import time

import torch

from activation_store.harvest.model import LoadedViT, ModelConfig
from activation_store.harvest.pipeline import _device_moments


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="ViT-L-14")
    ap.add_argument("--layers", default="2,5,8,11,14,17,20,22")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    vit = LoadedViT(ModelConfig(model=args.model, pretrained="none", device="cuda", compute_dtype=args.dtype), layers)
    b = args.batch_size
    x = vit.normalize(torch.randint(0, 255, (b, 224, 224, 3), dtype=torch.uint8, device="cuda"))
    dev = torch.empty((len(layers), b, vit.n_tokens, vit.width), dtype=torch.float16, device="cuda")
    host = torch.empty_like(dev, device="cpu").pin_memory()
    index = {layer: i for i, layer in enumerate(layers)}

    def sink(layer, t):
        dev[index[layer]].copy_(t)

    stages = {
        "forward": lambda: vit.forward(x, None),
        "+ hook copies": lambda: vit.forward(x, sink),
        "+ statistics": lambda: (vit.forward(x, sink), _device_moments(dev)),
        "+ copy to pinned host": lambda: (vit.forward(x, sink), _device_moments(dev), host.copy_(dev, non_blocking=True)),
    }
    print(f"{'stage':<24} {'ms/batch':>9} {'img/s':>8}")
    for name, fn in stages.items():
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            fn()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / args.iters
        print(f"{name:<24} {dt * 1e3:>9.1f} {b / dt:>8.0f}")
    t0 = time.perf_counter()
    for _ in range(args.iters):
        _device_moments(dev)
    torch.cuda.synchronize()
    print(f"{'statistics alone':<24} {(time.perf_counter() - t0) / args.iters * 1e3:>9.1f}")


if __name__ == "__main__":
    main()
