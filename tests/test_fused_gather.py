"""The readers' fused gather gives, bit for bit, what torch's own ops give: decode (float8 e4m3fn
with its per-token scale, float16, bfloat16, float32), normalise in float32, cast to the output
dtype, for every storage dtype and output dtype a reader offers, special values included."""

import numpy as np
import pytest
import torch

from activation_store.readers.fused_gather import OUTPUT_VIEW, SOURCE_VIEW, gather_rows

D = 96
ROWS = 300
TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _window(storage: str, rng) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """A window of raw bits, its float32 values (torch's decoding), and the per-token scales."""
    scales = np.ones(ROWS, dtype=np.float32)
    if storage == "fp8":
        codes = rng.integers(0, 256, (ROWS, D)).astype(np.uint8)
        codes[codes & 0x7F == 0x7F] = 0  # e4m3fn's NaN codes are never stored
        finite = np.array([c for c in range(256) if c & 0x7F != 0x7F], dtype=np.uint8)  # all 254 of them
        codes[:3].flat[:len(finite)] = finite
        codes[3, :8] = np.arange(8) | 0x80  # negative subnormals and -0
        scales = (rng.lognormal(0, 4, ROWS)).astype(np.float32)
        scales[4] = 2.0 ** -120  # products in float32's subnormal range
        values = torch.from_numpy(codes).view(torch.float8_e4m3fn).to(torch.float32) * torch.from_numpy(scales)[:, None]
        return codes.view(np.int8), values, scales
    x = (rng.standard_normal((ROWS, D)) * rng.lognormal(0, 3, (ROWS, 1))).astype(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, 6e-8, -6e-8, 65504.0, 1e-40, 3e38, -3e38], dtype=np.float32)
    x[0, :len(special)] = special
    t = torch.from_numpy(x)
    if storage == "fp16":
        t = t.to(torch.float16)
        return t.view(torch.int16).numpy(), t.to(torch.float32), scales
    if storage == "bf16":
        t = t.to(torch.bfloat16)
        return t.view(torch.int16).numpy().view(np.uint16), t.to(torch.float32), scales
    return x, t, scales


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a32, b32 = a.to(torch.float32), b.to(torch.float32)
    nan = torch.isnan(a32)
    if not torch.equal(nan, torch.isnan(b32)):
        return False
    ai = a[~nan].view(torch.int16 if a.element_size() == 2 else torch.int32)
    bi = b[~nan].view(torch.int16 if b.element_size() == 2 else torch.int32)
    return torch.equal(ai, bi)


@pytest.mark.parametrize("storage", ["fp8", "fp16", "bf16", "fp32"])
@pytest.mark.parametrize("out_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("normalise", [False, True])
def test_fused_gather_equals_torch(storage, out_dtype, normalise):
    rng = np.random.default_rng([7, len(storage), len(out_dtype), normalise])
    src, values, scales = _window(storage, rng)
    assert src.dtype == SOURCE_VIEW[storage]
    idx = rng.integers(0, ROWS, 700).astype(np.int64)
    idx[:5] = [0, 1, 2, 3, 4]  # the rows of special values
    shift = (rng.standard_normal(D) * 3).astype(np.float32)
    scale = rng.lognormal(0, 1, D).astype(np.float32)
    if not normalise:
        shift, scale = np.zeros(D, np.float32), np.ones(D, np.float32)
    ref = values[torch.from_numpy(idx)]
    if normalise:
        ref = ref.sub_(torch.from_numpy(shift)).mul_(torch.from_numpy(scale))
    ref = ref.to(TORCH[out_dtype])
    out = torch.full((len(idx), D), 7.0, dtype=TORCH[out_dtype])
    out_np = out.numpy() if out_dtype == "float32" else out.view(torch.int16).numpy().view(OUTPUT_VIEW[out_dtype])
    gather_rows(src, idx, scales, shift, scale, normalise, out_np)
    assert _same_bits(out, ref)


def test_fused_gather_writes_only_its_rows():
    """A slice of a batch: the rows before and after it are left as they were."""
    rng = np.random.default_rng(3)
    src, values, scales = _window("fp16", rng)
    out = torch.full((50, D), -1.0)
    one = np.ones(D, np.float32)
    gather_rows(src, np.arange(10, 30, dtype=np.int64), scales, one, one, False, out.numpy()[20:40])
    assert torch.equal(out[20:40], values[10:30])
    assert bool((out[:20] == -1).all()) and bool((out[40:] == -1).all())
