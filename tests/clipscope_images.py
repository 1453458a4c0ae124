"""Deterministic test images for the `clipscope` preprocessing preset, shared by
scripts/make_clipscope_golden.py (which runs HF's CLIPImageProcessor on them under transformers
4.45.2) and tests/test_preprocess_presets.py (which runs ours): both build every image from its
spec alone, so the golden file stores specs and hashes, not images.

A spec is a dict: id, mode (a PIL mode, "P;trns" / "P;alpha" for palette images with a transparent
index / per-entry alpha), w, h, seed, noise (0..1: how much of the image is per-pixel noise), and
optionally mean/std (the normalisation; default CLIP-Scope's 0.5)."""

from __future__ import annotations

import numpy as np
from PIL import Image

SIZE = 224  # shortest edge and crop, as CLIP-Scope's ViT-L-14 takes them
CLIPSCOPE_MEAN = CLIPSCOPE_STD = (0.5, 0.5, 0.5)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# every mode Pillow opens files in and converts to RGB (decode.py converts whatever it opens)
MODES = ("RGB", "L", "LA", "RGBA", "P", "P;trns", "P;alpha", "CMYK", "I;16", "I;16B", "I", "F", "1", "PA",
         "YCbCr", "LAB", "HSV", "RGBX")


def margin(w: int, h: int, size: int = SIZE) -> int:
    """Pixels the centre crop cuts off the long side after the shortest side is resized to `size`."""
    short, long = (w, h) if w <= h else (h, w)
    return int(size * long / short) - size


def _long_side_for(short: int, margin_mod4: int, start: int) -> int:
    """The smallest long side >= start whose margin (for this short side) is margin_mod4 mod 4."""
    long = start
    while margin(short, long) % 4 != margin_mod4:
        long += 1
    return long


def _sizes() -> list[tuple[int, int, str]]:
    """(w, h, why): every margin class, tall and wide, down- and upscaled, and the edge cases.
    Heights of 1 and 3 are left out: HF 4.45 reads such an array as channels-first (a bug of its
    channel inference), so its output for them is not the preprocessing of the image."""
    out = []
    for short in (100, 224, 257, 480):  # upscaled, not resized, downscaled
        for k in range(4):
            for frac, tag in ((1.31, "a"), (1.77, "b")):
                long = _long_side_for(short, k, int(short * frac))
                out.append((long, short, f"wide short={short} margin%4={k} {tag}"))
                out.append((short, long, f"tall short={short} margin%4={k} {tag}"))
    out += [(224, 224, "square 224"), (300, 300, "square 300"), (150, 150, "square 150"), (7, 7, "square 7"),
            (2, 2, "2x2"), (7, 2, "7x2"), (2, 7, "2x7"), (4, 5, "4x5"), (225, 224, "margin 1"),
            (224, 227, "margin 3"), (1000, 60, "very wide"), (60, 1000, "very tall"), (3, 40, "width 3"),
            (641, 427, "photo landscape"), (427, 641, "photo portrait"), (1023, 767, "4:3"), (767, 1024, "3:4")]
    return out


def golden_specs() -> list[dict]:
    """The images of the golden file: the sizes above in RGB (noisy and smooth), every mode at a few
    sizes (a 3-mod-4 margin among them), and a few with OpenAI's mean/std (other normalisation)."""
    specs = []
    for i, (w, h, why) in enumerate(_sizes()):
        specs.append({"mode": "RGB", "w": w, "h": h, "noise": (0.0, 0.15, 1.0)[i % 3], "why": why})
    mode_sizes = [(317, 240, "wide"), (224, 301, "tall, margin 3 mod 4"), (180, 130, "upscaled"), (53, 53, "square")]
    for mode in MODES:
        for j, (w, h, why) in enumerate(mode_sizes):
            specs.append({"mode": mode, "w": w, "h": h, "noise": (0.3, 1.0)[j % 2], "why": why})
    for j, (w, h) in enumerate([(301, 224), (224, 224), (500, 333), (129, 97)]):
        specs.append({"mode": ("RGB", "L", "RGBA", "P")[j], "w": w, "h": h, "noise": 0.5, "mean": list(OPENAI_MEAN),
                      "std": list(OPENAI_STD), "why": "OpenAI mean/std"})
    for i, s in enumerate(specs):
        s["id"] = i
        s["seed"] = 1000 + i
    return specs


def _levels(rng, h: int, w: int, channels: int, noise: float) -> np.ndarray:
    """(h, w, channels) floats in [0, 1]: smooth gradients and rings, mixed with uniform noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    yy, xx = yy / max(h - 1, 1), xx / max(w - 1, 1)
    out = np.empty((h, w, channels))
    for c in range(channels):
        a, b, f = rng.uniform(0.5, 6.0, 3)
        ph = rng.uniform(0, 2 * np.pi)
        smooth = 0.5 + 0.25 * np.sin(2 * np.pi * a * xx + ph) + 0.25 * np.cos(2 * np.pi * (b * yy + f * xx * yy))
        out[..., c] = (1 - noise) * smooth + noise * rng.uniform(0, 1, (h, w))
    return np.clip(out, 0, 1)


def _u8(x: np.ndarray) -> np.ndarray:
    return np.round(x * 255).astype(np.uint8)


def make_image(spec: dict) -> Image.Image:
    """The PIL image of a spec (built from raw bytes, so it is the same under any Pillow version)."""
    rng = np.random.default_rng(spec["seed"])
    w, h, mode, noise = spec["w"], spec["h"], spec["mode"], spec["noise"]

    def raw(pil_mode, arr, rawmode=None):
        return Image.frombytes(pil_mode, (w, h), np.ascontiguousarray(arr).tobytes(), "raw", rawmode or pil_mode)

    if mode in ("RGB", "YCbCr", "LAB", "HSV"):
        return raw(mode, _u8(_levels(rng, h, w, 3, noise)))
    if mode == "L":
        return raw(mode, _u8(_levels(rng, h, w, 1, noise))[..., 0])
    if mode in ("LA", "PA"):
        return raw(mode, _u8(_levels(rng, h, w, 2, noise)))
    if mode in ("RGBA", "CMYK", "RGBX"):
        return raw(mode, _u8(_levels(rng, h, w, 4, noise)))
    if mode.startswith("P"):
        img = raw("P", _u8(_levels(rng, h, w, 1, noise))[..., 0])
        img.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        if mode == "P;trns":
            img.info["transparency"] = int(rng.integers(0, 256))
        elif mode == "P;alpha":
            img.info["transparency"] = rng.integers(0, 256, 256, dtype=np.uint8).tobytes()
        return img
    if mode == "I;16":
        return raw(mode, np.round(_levels(rng, h, w, 1, noise)[..., 0] * 65535).astype("<u2"))
    if mode == "I;16B":
        return raw(mode, np.round(_levels(rng, h, w, 1, noise)[..., 0] * 65535).astype(">u2"))
    if mode == "I":  # beyond 0..255 both ways: the conversion clips
        return raw(mode, np.round(_levels(rng, h, w, 1, noise)[..., 0] * 900 - 300).astype("<i4"), "I;32S")
    if mode == "F":
        return raw(mode, (_levels(rng, h, w, 1, noise)[..., 0] * 400 - 60).astype("<f4"), "F;32F")
    if mode == "1":
        return raw(mode, np.where(_levels(rng, h, w, 1, noise)[..., 0] > 0.5, 255, 0).astype(np.uint8), "1;8")
    raise ValueError(f"unknown mode {mode!r}")


def mean_std(spec: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return tuple(spec.get("mean", CLIPSCOPE_MEAN)), tuple(spec.get("std", CLIPSCOPE_STD))


def checks(u8_crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per channel row and column sums (3, crop) of a (crop, crop, 3) uint8 crop: small enough to
    store for every image, and they show where two crops differ (which rows, which columns)."""
    a = u8_crop.astype(np.uint32)
    return a.sum(axis=1).T.copy(), a.sum(axis=0).T.copy()


def to_u8(pixel_values: np.ndarray, mean, std) -> np.ndarray:
    """(3, H, W) normalised float32 -> the (H, W, 3) uint8 levels they came from."""
    m = np.asarray(mean, dtype=np.float64).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float64).reshape(3, 1, 1)
    return np.clip(np.round((pixel_values.astype(np.float64) * s + m) * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
