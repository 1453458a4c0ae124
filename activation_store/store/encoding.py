"""Storage dtypes, codec presets and the writer-side lossy rounding.

Zarr 3.1 has no bfloat16 dtype, so bf16 is stored as its uint16 bit pattern and the array's
attributes name the logical dtype (see docs/format.md)."""

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
}
_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}

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

    def compressors(self) -> list:
        """Bytes-to-bytes codecs, crc32c last so every stored chunk carries a checksum."""
        typesize = physical_dtype(self.dtype).itemsize
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
        """Worst-case error of the writer's rounding: |x' - x| <= rel * |x| + abs."""
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
