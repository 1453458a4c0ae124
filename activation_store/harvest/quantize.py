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

from activation_store.harvest.device_graph import device_constant

E4M3_MAX = 448.0


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations (..., d) of any float dtype to (codes uint8 (..., d), scales float32 (...)),
    on x's device."""
    x = x.to(torch.float32)
    # a tensor divisor: CUDA divides by a Python scalar as a multiplication by its reciprocal, not
    # the exact division of the recipe
    scales = x.abs().amax(dim=-1) / device_constant(
        ("e4m3_max", x.device), lambda: torch.tensor(E4M3_MAX, dtype=torch.float32, device=x.device))
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = (x / divisor.unsqueeze(-1)).to(torch.float8_e4m3fn).view(torch.uint8)
    return codes, scales


def dequantize_fp8(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The stored values: float32(e4m3(code)) * scale, one float32 multiplication, then `dtype`
    (equal to `store.encoding.dequantize_fp8`; what the statistics of a harvest are computed on)."""
    x = codes.view(torch.float8_e4m3fn).to(torch.float32) * scales.to(torch.float32).unsqueeze(-1)
    return x if dtype == torch.float32 else x.to(dtype)


ERROR_FIGURES = ("max_abs", "max_rel", "sum_sq_err", "sum_sq")  # ShardWriter.add_lossy_error's


def error_figures(x: torch.Tensor, stored: torch.Tensor, keep: int = 0) -> torch.Tensor:
    """The writer's measure of the error of float32 `stored` against the given `x`, on their device,
    for each index of the first `keep` dimensions (a harvest keeps (location, image), so that images
    dropped for NaN/inf can be left out on the host): the ERROR_FIGURES along a last axis, max_rel
    over |x| >= fp16's smallest normal, the sums in float64."""
    x = x.to(torch.float32)
    err = (stored.to(torch.float32) - x).abs_()
    mag = x.abs()
    tiny = torch.finfo(torch.float16).tiny
    rel = torch.where(mag >= tiny, err / mag.clamp_min(tiny), torch.zeros((), dtype=err.dtype, device=err.device))
    out = torch.zeros((*x.shape[:keep], len(ERROR_FIGURES)), dtype=torch.float64, device=x.device)
    if x.numel():
        out[..., 0] = err.flatten(keep).amax(dim=-1)
        out[..., 1] = rel.flatten(keep).amax(dim=-1)
        out[..., 2] = err.square_().flatten(keep).sum(dim=-1, dtype=torch.float64)
        out[..., 3] = mag.square_().flatten(keep).sum(dim=-1, dtype=torch.float64)
    return out


def quantization_error(x: torch.Tensor, stored: torch.Tensor) -> dict:
    """`error_figures` over all of x, as the dict `ShardWriter.add_lossy_error` takes."""
    return dict(zip(ERROR_FIGURES, (float(v) for v in error_figures(x, stored))))
