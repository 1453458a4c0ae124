"""Storage dtypes, codec presets and the writer-side lossy rounding.

Zarr 3.1 has no bfloat16 dtype, so bf16 is stored as its uint16 bit pattern and the array's
attributes name the logical dtype (see docs/format.md). `fp8` (format 2.0) is one byte per value:
float8 e4m3fn codes in uint8, with one float32 scale per token in a companion array (docs/format.md,
"fp8"); numpy has no float8, so both directions are done here with integer arithmetic."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec

from activation_store.errors import ConfigError

# logical dtype -> (zarr/numpy physical dtype, fill value, mantissa bits)
_DTYPES = {
    "fp16": (np.dtype("float16"), float("nan"), 10),
    "bf16": (np.dtype("uint16"), 0x7FC0, 7),  # 0x7FC0 is bf16's quiet NaN
    "fp32": (np.dtype("float32"), float("nan"), 23),
    "fp8": (np.dtype("uint8"), 0x7F, 3),  # e4m3fn codes; 0x7F is its NaN (the scales' fill is NaN too)
}
_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32",
            "e4m3": "fp8", "fp8_e4m3": "fp8", "float8_e4m3fn": "fp8"}
DTYPES = tuple(_DTYPES)
QUANTIZED_DTYPES = ("fp8",)  # stored as codes plus per-token scales (a companion array per array)
SCALE_DTYPE = np.dtype("float32")

LOSSLESS_PRESETS = ("none", "zstd", "shuffle-zstd")
LOSSY_PRESETS = ("bitround-shuffle-zstd",)
PRESETS = LOSSLESS_PRESETS + LOSSY_PRESETS


# The `encoding` entry of a bf16 array's attributes (format 1.1, optional): how a reader without this
# package (plain zarr, xarray.open_zarr, tensorstore) turns the stored uint16 values into floats.
BF16_ENCODING = (
    "bfloat16 bit patterns in uint16: float32 = uint32(value) << 16, the 32 bits read as IEEE-754 float32 "
    "(numpy: (a.astype(np.uint32) << 16).view(np.float32))"
)


def array_encoding(dtype: str) -> str | None:
    """What an array's `encoding` attribute says for a storage dtype; None when zarr's own dtype is the
    value's (fp16, fp32: the stored numbers are the values)."""
    return BF16_ENCODING if canonical_dtype(dtype) == "bf16" else None


def is_quantized(dtype: str) -> bool:
    """Whether a storage dtype keeps its values as codes plus a scale per token (fp8)."""
    return canonical_dtype(dtype) in QUANTIZED_DTYPES


def canonical_dtype(name: str) -> str:
    name = _ALIASES.get(str(name).lower(), str(name).lower())
    if name not in _DTYPES:
        raise ConfigError(f"unknown storage dtype {name!r}; choose one of {', '.join(_DTYPES)}")
    return name


def physical_dtype(dtype: str) -> np.dtype:
    return _DTYPES[canonical_dtype(dtype)][0]


def fill_value(dtype: str):
    return _DTYPES[canonical_dtype(dtype)][1]


def mantissa_bits(dtype: str) -> int:
    return _DTYPES[canonical_dtype(dtype)][2]


@dataclass(frozen=True)
class CodecSpec:
    """A codec preset resolved for one storage dtype."""

    preset: str
    dtype: str
    zstd_level: int = 1
    keepbits: int | None = None  # lossy presets only

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown codec preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.lossy and is_quantized(self.dtype):
            raise ConfigError(f"preset {self.preset!r} rounds fp16/bf16/fp32 mantissas; {self.dtype} is already one "
                              f"byte per value: use none, zstd or shuffle-zstd")
        if self.lossy:
            mbits = mantissa_bits(self.dtype)
            if self.keepbits is None or not 1 <= self.keepbits < mbits:
                raise ConfigError(
                    f"preset {self.preset!r} on {self.dtype} needs keepbits between 1 and {mbits - 1}, "
                    f"got {self.keepbits}"
                )

    @property
    def lossy(self) -> bool:
        return self.preset in LOSSY_PRESETS

    def compressors(self, typesize: int | None = None) -> list:
        """Bytes-to-bytes codecs, crc32c last so every stored chunk carries a checksum. `typesize`:
        of the array's values when it is not the storage dtype's (the float32 scales of fp8)."""
        typesize = typesize or physical_dtype(self.dtype).itemsize
        chain: list = []
        if self.preset == "zstd":
            chain.append(ZstdCodec(level=self.zstd_level))
        elif self.preset in ("shuffle-zstd", "bitround-shuffle-zstd"):
            chain.append(BloscCodec(typesize=typesize, cname="zstd", clevel=self.zstd_level, shuffle="shuffle"))
        chain.append(Crc32cCodec())
        return chain

    def serializer(self) -> BytesCodec:
        return BytesCodec(endian="little")

    def error_bound(self) -> dict | None:
        """Worst-case error of the writer's rounding: |x' - x| <= rel * |x| + abs (fp8: abs is
        `absolute_per_scale` times the token's scale)."""
        if is_quantized(self.dtype):
            return dict(FP8_ERROR_BOUND)
        if not self.lossy:
            return None
        drop = mantissa_bits(self.dtype) - self.keepbits
        smallest_subnormal = {"fp16": 2.0**-24, "bf16": 2.0**-133, "fp32": 2.0**-149}[self.dtype]
        return {"relative": 2.0 ** -(self.keepbits + 1), "absolute": 2.0 ** (drop - 1) * smallest_subnormal}

    def describe(self) -> dict:
        return {
            "preset": self.preset,
            "zstd_level": self.zstd_level,
            "keepbits": self.keepbits,
            "error_bound": self.error_bound(),
        }


def to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """Cast floating activations to the storage representation (round to nearest even)."""
    dtype = canonical_dtype(dtype)
    x = np.asarray(x)
    if dtype == "bf16":
        if x.dtype == np.uint16:  # already bf16 bit patterns
            return x
        f = np.ascontiguousarray(x, dtype=np.float32)
        u = f.view(np.uint32)
        rounded = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
        nan = np.isnan(f)
        if nan.any():
            rounded[nan] = 0x7FC0
        return rounded
    if x.dtype == np.uint16:
        raise ConfigError("uint16 input is taken as bf16 bit patterns, but this store's dtype is " + dtype)
    with np.errstate(over="ignore"):  # overflow becomes inf, which the writer rejects by name
        return x.astype(physical_dtype(dtype), copy=False)


def to_float32(raw: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Decode stored values to float32 (into `out` when given, which avoids a fresh allocation)."""
    dtype = canonical_dtype(dtype)
    if out is None:
        out = np.empty(raw.shape, dtype=np.float32)
    if dtype == "bf16":
        view = out.view(np.uint32)
        np.left_shift(raw, 16, out=view, dtype=np.uint32)
    else:
        np.copyto(out, raw, casting="unsafe")
    return out


def bitround(raw: np.ndarray, dtype: str, keepbits: int) -> np.ndarray:
    """Round the mantissa of stored values to `keepbits` bits, to nearest even, in place.

    Rounding that would overflow to infinity falls back to truncation; NaN and inf are left alone.
    """
    dtype = canonical_dtype(dtype)
    drop = mantissa_bits(dtype) - keepbits
    if drop <= 0:
        return raw
    utype = np.uint32 if dtype == "fp32" else np.uint16
    bits = raw.view(utype)
    exp_mask = {"fp16": 0x7C00, "bf16": 0x7F80, "fp32": 0x7F800000}[dtype]
    finite = (bits & utype(exp_mask)) != utype(exp_mask)
    keep_mask = utype(~((1 << drop) - 1) & (0xFFFFFFFF if utype is np.uint32 else 0xFFFF))
    half_minus_one = utype((1 << (drop - 1)) - 1)
    lsb = (bits >> utype(drop)) & utype(1)
    rounded = (bits + half_minus_one + lsb) & keep_mask
    overflowed = (rounded & utype(exp_mask)) == utype(exp_mask)
    rounded = np.where(overflowed, bits & keep_mask, rounded)
    np.copyto(bits, rounded, where=finite)
    return raw


_MAGNITUDE = {"fp16": (np.uint16, 0x7FFF, 0x7C00), "bf16": (np.uint16, 0x7FFF, 0x7F80),
              "fp32": (np.uint32, 0x7FFFFFFF, 0x7F800000)}


def nonfinite_rows(raw: np.ndarray, dtype: str) -> np.ndarray | None:
    """None when every value is finite; else a bool per leading-axis row marking rows with NaN/inf.

    A value is NaN or inf exactly when its magnitude bits reach the all-ones exponent, so one
    max-reduction over the bit patterns (7 GB/s here, 5x np.isfinite on fp16) answers the common case."""
    utype, mag, inf = _MAGNITUDE[canonical_dtype(dtype)]
    bits = raw.reshape(raw.shape[0], -1).view(utype) & utype(mag)
    if bits.size == 0 or bits.max() < inf:
        return None
    return (bits >= inf).any(axis=1)


# ---------------------------------------------------------------------------- fp8 (format 2.0)
# float8 e4m3fn (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no infinities, 0x7F/0xFF NaN,
# largest finite 448), one float32 scale per token: value = E4M3[code] * scale, scale = absmax / 448.
# Chosen over e5m2, int8 per token and int8 per channel by benchmarks/quantize_schemes.py (docs/format.md).
E4M3_MAX = 448.0
_E4M3_MAX_BITS = np.float32(E4M3_MAX).view(np.uint32)
_E4M3_MIN_NORMAL_BITS = np.float32(2.0**-6).view(np.uint32)
# relative error 2^-4 (half a step of 3 mantissa bits) for normal codes; below 2^-6 (subnormal codes, step
# 2^-9) an absolute error of at most 2^-10 of the token's scale; plus the float32 roundings of x / scale and
# of code * scale (2^-24 relative each)
FP8_ERROR_BOUND = {"relative": 2.0**-4, "absolute_per_scale": 2.0**-10}
FP8_ENCODING = (
    "float8 e4m3fn codes in uint8 (bit 7 sign, bits 6-3 exponent with bias 7, bits 2-0 mantissa; exponent 0: "
    "subnormal, code & 0x7F == 0x7F: NaN), each multiplied by its token's float32 scale from the companion array "
    "(scales/<array>): float32 value = float32(E4M3[code]) * scale, E4M3[c] = (-1)^(c>>7) * (c>>3 & 15 == 0 ? "
    "(c & 7) * 2^-9 : (1 + (c & 7) / 8) * 2^((c>>3 & 15) - 7))"
)


def _e4m3_table() -> np.ndarray:
    """The 256 values of e4m3fn codes as float32 (the decoding table of docs/format.md)."""
    c = np.arange(256)
    sign = np.where(c >> 7, -1.0, 1.0)
    e, m = (c >> 3) & 15, c & 7
    mag = np.where(e == 0, m * 2.0**-9, (1 + m / 8) * 2.0 ** (e - 7.0))
    mag = np.where((c & 0x7F) == 0x7F, np.nan, mag)
    return (sign * mag).astype(np.float32)


E4M3_TABLE = _e4m3_table()


def e4m3_encode(y: np.ndarray) -> np.ndarray:
    """float32 values to e4m3fn codes, rounding to nearest even; magnitudes above 448 saturate to
    448 (as torch's float8_e4m3fn cast does), so finite input never becomes NaN. Bit-identical to
    `torch.Tensor.to(torch.float8_e4m3fn)` (tests/test_quantized_encoding.py)."""
    bits = np.ascontiguousarray(y, dtype=np.float32).view(np.uint32)
    a = bits & np.uint32(0x7FFFFFFF)
    # normal codes: round the float32 mantissa to 3 bits (to nearest even), rebias the exponent 127 -> 7
    r = a + np.uint32(0x7FFFF) + ((a >> np.uint32(20)) & np.uint32(1))
    code = (((r >> np.uint32(20)) - np.uint32(120 << 3)) & np.uint32(0x7F)).astype(np.uint8)
    small = a < _E4M3_MIN_NORMAL_BITS
    if small.any():  # subnormal codes count steps of 2^-9 (8 steps is 2^-6: code 0x08, the smallest normal)
        sub = np.rint(np.abs(y[small].astype(np.float32)) * np.float32(512)).astype(np.uint8)
        code[small] = sub
    code[a > _E4M3_MAX_BITS] = 0x7E
    code |= ((bits >> np.uint32(24)) & np.uint32(0x80)).astype(np.uint8)
    return code


def e4m3_decode_into(codes: np.ndarray, out: np.ndarray) -> np.ndarray:
    """E4M3_TABLE[codes] into float32 `out` (same shape)."""
    np.take(E4M3_TABLE, codes, out=out)
    return out


def fp8_scales(x: np.ndarray) -> np.ndarray:
    """One float32 scale per token (the last axis holds the channels): max |x| / 448."""
    absmax = np.max(np.abs(x), axis=-1)
    return (absmax.astype(np.float32) / np.float32(E4M3_MAX)).astype(np.float32)


def quantize_fp8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Activations (..., d) (any float dtype, finite) to (codes uint8 (..., d), scales float32 (...)).

    The exact recipe, which `harvest.quantize.quantize_fp8` repeats in torch bit for bit: x in
    float32; scale = float32(max |x| of the token) / 448 (float32 division); code = e4m3(x / scale)
    (float32 division, rounding to nearest even); a token of zeros has scale 0 and codes 0."""
    x = np.asarray(x)
    x = x if x.dtype == np.float32 else x.astype(np.float32)
    scales = fp8_scales(x)
    divisor = np.where(scales > 0, scales, np.float32(1))[..., None]
    return e4m3_encode(x / divisor), scales


def dequantize_fp8(codes: np.ndarray, scales: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Codes (..., d) and their scales (...) to float32: E4M3_TABLE[code] * scale, one float32
    multiplication (into `out` when given)."""
    if out is None:
        out = np.empty(codes.shape, dtype=np.float32)
    e4m3_decode_into(codes, out)
    np.multiply(out, np.asarray(scales, dtype=np.float32)[..., None], out=out)
    return out


def nonfinite_tokens(x: np.ndarray) -> np.ndarray | None:
    """None when every value of (B, ...) float input is finite; else a bool per leading-axis row."""
    x = np.asarray(x)
    if x.dtype == np.uint16 or x.dtype.kind != "f":
        return None
    flat = x.reshape(x.shape[0], -1)
    if np.isfinite(flat.max(initial=0.0)) and np.isfinite(flat.min(initial=0.0)):
        return None
    return ~np.isfinite(flat).all(axis=1)
