"""Synthetic ViT-like activations for tests, benchmarks and the demo: per-channel scales spread
over two orders of magnitude, a few massive-activation channels, a low-rank shared component and
a CLS token unlike the patches. Compression ratios on these are close to those measured on real
ViT-L-14 residuals (see docs/benchmarks.md), which plain Gaussian noise would overstate."""

from __future__ import annotations

import numpy as np


def synthetic_activations(seed: int, n_images: int, n_tokens: int = 257, d_model: int = 64,
                          dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # structure is shared across calls with different seeds: it belongs to the "model"
    structure = np.random.default_rng(12345)
    scales = np.exp(structure.normal(0.0, 0.8, d_model)).astype(np.float32)
    massive = structure.choice(d_model, size=max(1, d_model // 256), replace=False)
    scales[massive] *= 30.0
    rank = min(16, d_model)
    basis = structure.normal(0.0, 1.0, (rank, d_model)).astype(np.float32) / np.sqrt(rank)
    cls_offset = structure.normal(0.0, 2.0, d_model).astype(np.float32)

    x = rng.standard_normal((n_images, n_tokens, d_model), dtype=np.float32)
    x += rng.standard_normal((n_images, n_tokens, rank), dtype=np.float32) @ basis * 2.0
    x *= scales
    x[:, 0] += cls_offset * scales
    return x.astype(dtype)
