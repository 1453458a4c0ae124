"""Rows of a window gathered, decoded, normalised and converted in one pass (compiled with numba).

A reader's batch is `out[r] = convert(normalise(decode(window[idx[r]])))`. Done with torch ops it
is one pass over the rows per op (gather, widen, shift, mask, convert, multiply, subtract, ...),
each reading and writing the block again: measured on one core at d 1024, fp16 -> float32 cost
0.93-1.08 ns a value that way and 0.46-0.66 fused; fp8 -> float32 1.6 and 0.44; fp8 -> float16
0.18. Each value is read once, computed in registers and written once, in the output dtype, so
the batch is the only memory written and there is no scratch.

Exactly the arithmetic the reference does, in float32, in the same order (numba does not contract
a multiply and an add into an FMA without fastmath, which is off):
- float16 is widened exactly (LLVM's `fpext half`, the F16C/AVX-512 instruction);
- bfloat16 is its bits shifted into the top half of a float32 (exact);
- fp8 (float8 e4m3fn codes, format 2): the code, sign-extended to 16 bits, shifted left by 7 and
  masked with 0xBF80 is the float16 of value/256 exactly (subnormals included), so one float32
  multiplication by 256*scale (exact: a power of two) is E4M3[code] * scale with one rounding;
- normalisation is `(x - shift) * scale` per channel, two float32 roundings, as `Normalizer.apply_`;
- float16 output rounds to nearest even (`fptrunc`, as torch's cast); bfloat16 output rounds to
  nearest even as torch's scalar cast does (a NaN becomes 0x7FC0).

Arrays come in as numpy views of the same memory, typed by what their bits are: fp8 codes int8,
float16 bits int16, bfloat16 bits uint16, float32 as itself (for the output too). The kernels
release the GIL; the engine runs them in its gather threads. They are compiled on first use (and
cached on disk beside this file, or in numba's user cache where that is not writable);
`warm_up` compiles the one a reader needs before its first batch."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

FP8_MASK = -16512  # 0xBF80 as int16: sign, and the 7 bits of exponent and mantissa, of e4m3 << 7 as float16
_BF16_NAN = 0x7FC0

# the numpy dtype a window or an output is seen as, by its storage or torch dtype name
SOURCE_VIEW = {"fp8": np.int8, "fp16": np.int16, "bf16": np.uint16, "fp32": np.float32}
OUTPUT_VIEW = {"float32": np.float32, "float16": np.int16, "bfloat16": np.uint16}


@intrinsic
def _half_bits_to_f32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.int16), codegen


@intrinsic
def _f32_to_half_bits(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.int16(types.float32), codegen


@intrinsic
def _u32_as_f32(typingctx, u):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _f32_as_u32(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


def _row_factor(src, scales, i):  # typed by the overload below
    raise NotImplementedError


def _value(v, factor):
    raise NotImplementedError


def _put(dst, j, x):
    raise NotImplementedError


@overload(_row_factor, inline="always")
def _row_factor_impl(src, scales, i):
    if src.dtype == types.int8:  # fp8: the token's scale, times 256 (see the module docstring)
        return lambda src, scales, i: scales[i] * np.float32(256.0)
    return lambda src, scales, i: np.float32(1.0)


@overload(_value, inline="always")
def _value_impl(v, factor):
    if v == types.int8:
        # 16-bit lanes throughout: an untyped 7 or mask would widen the vector arithmetic to int64
        return lambda v, factor: _half_bits_to_f32((np.int16(v) << np.int16(7)) & np.int16(FP8_MASK)) * factor
    if v == types.int16:
        return lambda v, factor: _half_bits_to_f32(v)
    if v == types.uint16:
        return lambda v, factor: _u32_as_f32(np.uint32(np.uint32(v) << np.uint32(16)))
    if v == types.float32:
        return lambda v, factor: v
    return None


@overload(_put, inline="always")
def _put_impl(dst, j, x):
    if dst.dtype == types.float32:
        def put_f32(dst, j, x):
            dst[j] = x
        return put_f32
    if dst.dtype == types.int16:
        def put_f16(dst, j, x):
            dst[j] = _f32_to_half_bits(x)
        return put_f16
    if dst.dtype == types.uint16:
        def put_bf16(dst, j, x):
            u = _f32_as_u32(x)
            if x != x:
                dst[j] = _BF16_NAN
            else:
                dst[j] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
        return put_bf16
    return None


@njit(nogil=True, cache=True, boundscheck=False)
def gather_rows(src, idx, scales, shift, scale, normalise, out):
    """out[r] = (decode(src[idx[r]]) - shift) * scale (or without normalisation), in out's dtype.

    src: (rows, d) window; idx: (n,) int64 rows of it; scales: (rows,) float32 per-token scales (fp8
    only; anything else ignores it); shift, scale: (d,) float32; out: (n, d), C-contiguous."""
    d = src.shape[1]
    for r in range(idx.shape[0]):
        i = idx[r]
        factor = _row_factor(src, scales, i)
        row = src[i]
        dst = out[r]
        if normalise:
            for j in range(d):
                _put(dst, j, (_value(row[j], factor) - shift[j]) * scale[j])
        else:
            for j in range(d):
                _put(dst, j, _value(row[j], factor))


NO_SCALES = np.ones(1, dtype=np.float32)


def warm_up(storage_dtype: str, out_dtype: str) -> None:
    """Compile (or load from the cache) the kernel for this pair now, not at the first batch."""
    d = 4
    src = np.zeros((2, d), dtype=SOURCE_VIEW[storage_dtype])
    out = np.empty((1, d), dtype=OUTPUT_VIEW[out_dtype])
    ones = np.ones(d, dtype=np.float32)
    gather_rows(src, np.zeros(1, dtype=np.int64), np.ones(2, dtype=np.float32), ones, ones, True, out)
