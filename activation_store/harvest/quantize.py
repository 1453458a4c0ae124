"""fp8 quantisation on the device, bit-identical to the store's numpy writer
(`store.encoding.quantize_fp8`), so a harvest can quantise where the activations are and ship one
byte per value (plus a float32 per token) to the writer.

The recipe is the format's (docs/format.md, "fp8"): x in float32; scale = max |x| of the token /
448 (float32 division); code = float8_e4m3fn(x / scale) (float32 division; torch's cast rounds to
nearest even and saturates at 448, as the numpy encoder does); a token of zeros has scale 0 and
codes 0. IEEE float32 division and max are exact operations on CPU and CUDA alike, so the codes
and scales equal the numpy writer's bit for bit (tests/test_quantized_encoding.py checks it on CPU
tensors)."""

from __future__ import annotations

import torch

E4M3_MAX = 448.0


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations (..., d) of any float dtype to (codes uint8 (..., d), scales float32 (...)),
    on x's device."""
    x = x.to(torch.float32)
    scales = x.abs().amax(dim=-1) / torch.tensor(E4M3_MAX, dtype=torch.float32, device=x.device)
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = (x / divisor.unsqueeze(-1)).to(torch.float8_e4m3fn).view(torch.uint8)
    return codes, scales


def dequantize_fp8(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The stored values: float32(e4m3(code)) * scale, one float32 multiplication, then `dtype`
    (equal to `store.encoding.dequantize_fp8`; what the statistics of a harvest are computed on)."""
    x = codes.view(torch.float8_e4m3fn).to(torch.float32) * scales.to(torch.float32).unsqueeze(-1)
    return x if dtype == torch.float32 else x.to(dtype)


def quantization_error(x: torch.Tensor, stored: torch.Tensor) -> dict:
    """The writer's measure of the error (`lossy_error` of a commit record) of float32 `stored`
    against the given `x`: max_abs, max_rel (over |x| >= fp16's smallest normal), sum_sq_err, sum_sq
    (float64 sums); pass it to `ShardWriter.add_lossy_error` when the writer gets codes."""
    x = x.to(torch.float32)
    err = (stored.to(torch.float32) - x).abs()
    mag = x.abs()
    rel = torch.where(mag >= torch.finfo(torch.float16).tiny, err / mag.clamp_min(torch.finfo(torch.float16).tiny),
                      torch.zeros_like(err))
    return {"max_abs": float(err.max()) if err.numel() else 0.0, "max_rel": float(rel.max()) if rel.numel() else 0.0,
            "sum_sq_err": float(err.double().square().sum()), "sum_sq": float(x.double().square().sum())}
