"""fp8 (float8 e4m3fn codes with one float32 scale per token): the numpy encoder is bit-exact
against torch's float8_e4m3fn cast, the decoding table is torch's, and the device quantiser of the
harvest (torch) gives the numpy writer's codes and scales bit for bit."""

import numpy as np
import pytest
import torch

from activation_store.harvest.quantize import dequantize_fp8 as torch_dequantize
from activation_store.harvest.quantize import quantization_error
from activation_store.harvest.quantize import quantize_fp8 as torch_quantize
from activation_store.store.encoding import (
    E4M3_TABLE,
    FP8_ERROR_BOUND,
    dequantize_fp8,
    e4m3_encode,
    quantize_fp8,
)


def torch_codes(y: np.ndarray) -> np.ndarray:
    return torch.from_numpy(y).to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def test_the_decoding_table_is_torch_float8_e4m3fn():
    want = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32).numpy()
    np.testing.assert_array_equal(E4M3_TABLE, want)  # NaN where torch has NaN (0x7F, 0xFF)
    assert E4M3_TABLE[0x7E] == 448 and E4M3_TABLE[0x01] == 2.0**-9 and E4M3_TABLE[0x80] == 0 and np.signbit(E4M3_TABLE[0x80])


def test_encoding_rounds_to_nearest_even_bit_exactly_as_torch():
    rng = np.random.default_rng(0)
    every_fp16 = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
    wide = (rng.standard_normal(200_000) * np.exp(rng.uniform(-25, 8, 200_000))).astype(np.float32)
    values = np.unique(E4M3_TABLE[np.isfinite(E4M3_TABLE)].astype(np.float64))
    ties = ((values[1:] + values[:-1]) / 2).astype(np.float32)  # exactly halfway: the even code wins
    near = np.concatenate([np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf))])
    edge = np.array([0.0, -0.0, 448, -448, 449, 464, 464.1, -465, 1e6, 3e38, 2.0**-6, 2.0**-9, 2.0**-10, 2.0**-11],
                    np.float32)
    for y in (every_fp16[np.isfinite(every_fp16)], wide, ties, -ties, near, edge):
        np.testing.assert_array_equal(e4m3_encode(y), torch_codes(y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_device_quantiser_gives_the_writer_s_codes_and_scales_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 9, 64, generator=g) * torch.logspace(-3, 3, 64)).to(dtype)
    x[0, 0] = 0  # a token of zeros: scale 0, codes 0
    x[1, 2, 5] = 4000.0  # an outlier channel sets its token's scale
    codes, scales = torch_quantize(x)
    want_codes, want_scales = quantize_fp8(x.float().numpy())
    assert codes.dtype == torch.uint8 and scales.dtype == torch.float32
    np.testing.assert_array_equal(codes.numpy(), want_codes)
    np.testing.assert_array_equal(scales.numpy().view(np.uint32), want_scales.view(np.uint32))
    assert scales[0, 0] == 0 and not codes[0, 0].any()
    stored = torch_dequantize(codes, scales)
    np.testing.assert_array_equal(stored.numpy(), dequantize_fp8(want_codes, want_scales))
    assert torch.equal(torch_dequantize(codes, scales, torch.bfloat16), stored.to(torch.bfloat16))


def test_the_error_stays_within_the_recorded_bound():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((50, 17, 256)) * np.exp(rng.uniform(-6, 6, (50, 17, 1)))).astype(np.float32)
    x[:, :, 3] *= 300  # outlier channels, as ViT residuals have
    codes, scales = quantize_fp8(x)
    err = np.abs(dequantize_fp8(codes, scales) - x)
    bound = FP8_ERROR_BOUND["relative"] * np.abs(x) + FP8_ERROR_BOUND["absolute_per_scale"] * scales[..., None]
    assert (err <= bound * (1 + 2.0**-20) + 1e-30).all()
    e = quantization_error(torch.from_numpy(x), torch.from_numpy(dequantize_fp8(codes, scales)))
    assert 0 < e["sum_sq_err"] / e["sum_sq"] < 2.0**-8 and e["max_abs"] == pytest.approx(float(err.max()))
