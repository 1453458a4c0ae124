"""Preprocessing presets: how an image becomes the pixels the ViT sees.

- `open_clip`: open_clip's own eval transform for the weights (torchvision Resize, CenterCrop,
  then RGB; ToTensor and Normalize on the device). The centre crop's offset is
  `int(round((size - crop) / 2))`, rounded half to even.
- `clipscope`: what Hugging Face's `CLIPImageProcessor` computes (transformers 4.45, which
  CLIP-Scope used to make the activations its SAEs were trained on): convert to RGB first (PIL's
  `convert("RGB")` for every mode but RGB), resize the shortest side with PIL bicubic (the long
  side truncated, `int(size * long / short)`), centre crop with floored offsets
  `(size - crop) // 2`, then `float32(u8 * (1/255) in float64)` and `(x - mean) / std` in float32.

The two differ by a one-pixel shift of the crop whenever the margin `size - crop` is 3 mod 4 (for
about a quarter of non-square images), and for palette and other non-RGB modes (open_clip resizes
before converting). `tests/test_preprocess_presets.py` checks the `clipscope` pixels bit for bit
against pixel values that transformers 4.45.2 computed (`tests/data/clipscope_preprocess_golden.npz`).

The decode workers apply the PIL stages and hand (H, W, 3) uint8 to the device; `Normalizer`
does the rest there. The transform is small and picklable (spawned decode workers receive it)."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from activation_store.configs import check_choice
from activation_store.errors import ConfigError

PRESETS = ("open_clip", "clipscope")
PRESET_CHOICES = ("auto", *PRESETS)
# CLIP-Scope's recipe: the model its SAEs were trained on, as open_clip names it and as HF does
CLIPSCOPE_MODEL = "ViT-L-14"
CLIPSCOPE_PRETRAINED = "laion2b_s32b_b82k"
CLIPSCOPE_HF_REPO = "laion/CLIP-ViT-L-14-laion2B-s32B-b82K"


def is_clipscope_hf_repo(name) -> bool:
    """Is `name` CLIP-Scope's HF model id, bare or as `hf-hub:` (hub ids ignore case)?"""
    name = str(name)
    if name.startswith("hf-hub:"):
        name = name[len("hf-hub:"):]
    return name.strip("/").lower() == CLIPSCOPE_HF_REPO.lower()


def resolve_preset(preset: str, model: str, pretrained, preprocess_tag: str | None = None) -> str:
    """`auto` is `clipscope` for CLIP-Scope's recipe (ViT-L-14 + laion2b_s32b_b82k, its weights as a
    file with that tag's preprocessing, or its HF repo as `hf-hub:`), `open_clip` for anything else;
    named presets are returned as they are."""
    check_choice("preprocessing preset (--preprocess)", preset, PRESET_CHOICES)
    if preset != "auto":
        return preset
    if is_clipscope_hf_repo(model):
        return "clipscope"
    tag = preprocess_tag if pretrained and os.path.isfile(str(pretrained)) else pretrained
    return "clipscope" if (str(model), str(tag)) == (CLIPSCOPE_MODEL, CLIPSCOPE_PRETRAINED) else "open_clip"


def resized_size(width: int, height: int, shortest: int) -> tuple[int, int]:
    """(width, height) after resizing the shortest side to `shortest`, the long side truncated, as
    both HF's `get_resize_output_image_size` and torchvision's Resize compute it."""
    if width <= height:
        return shortest, int(shortest * height / width)
    return int(shortest * width / height), shortest


class ClipScopeTransform:
    """The PIL stages of HF's CLIPImageProcessor (transformers 4.45): PIL image -> (crop, crop, 3) uint8.

    HF's own round trips (PIL -> numpy -> PIL for the resize, numpy slicing for the crop) are
    lossless for RGB uint8, so doing them in PIL and numpy directly gives the same bytes."""

    def __init__(self, shortest_edge: int = 224, crop_size: int = 224) -> None:
        self.shortest_edge, self.crop_size = int(shortest_edge), int(crop_size)
        if not 1 <= self.crop_size <= self.shortest_edge:
            raise ConfigError(f"clipscope preprocessing needs 1 <= crop size <= shortest edge, got crop "
                              f"{self.crop_size} and shortest edge {self.shortest_edge}")

    def __repr__(self) -> str:
        return f"ClipScopeTransform(shortest_edge={self.shortest_edge}, crop_size={self.crop_size})"

    def __call__(self, image: Image.Image) -> np.ndarray:
        if image.mode != "RGB":  # transformers' convert_rgb: PIL's own conversion, alpha dropped
            image = image.convert("RGB")
        width, height = image.size
        new_w, new_h = resized_size(width, height, self.shortest_edge)
        image = image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC, reducing_gap=None)
        pixels = np.asarray(image, dtype=np.uint8)
        c = self.crop_size
        top, left = (new_h - c) // 2, (new_w - c) // 2  # floored, unlike torchvision's round-half-even
        return np.array(pixels[top:top + c, left:left + c], dtype=np.uint8, order="C")  # a writable copy


def clipscope_lut(mean, std) -> np.ndarray:
    """(3, 256) float32: the normalised value of each uint8 level per channel, computed with HF's
    arithmetic (`rescale`: uint8 * (1/255) in float64, cast to float32; `normalize`: (x - mean) / std
    in float32 with mean and std cast to float32)."""
    x = (np.arange(256, dtype=np.uint8) * (1 / 255)).astype(np.float32)
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1)
    return ((x[None, :] - m) / s).astype(np.float32)


class Normalizer:
    """(B, H, W, 3) uint8 on the device -> normalised (B, 3, H, W) float32.

    `open_clip`: ToTensor + Normalize's float32 arithmetic (`u8 / 255`, then `(x - mean) / std`).
    `clipscope`: a lookup in `clipscope_lut`, so the values are HF's bit for bit on any device."""

    def __init__(self, preset: str, mean, std, device) -> None:
        check_choice("preprocessing preset", preset, PRESETS)
        self.preset = preset
        if preset == "clipscope":
            self._lut = torch.from_numpy(clipscope_lut(mean, std)).to(device)
            self._channel = torch.arange(3, device=device)
        else:
            self._mean = torch.tensor(list(mean), device=device).view(1, 3, 1, 1)
            self._std = torch.tensor(list(std), device=device).view(1, 3, 1, 1)

    def __call__(self, pixels_uint8: torch.Tensor) -> torch.Tensor:
        if self.preset == "clipscope":
            return self._lut[self._channel, pixels_uint8.long()].permute(0, 3, 1, 2).contiguous()
        x = pixels_uint8.permute(0, 3, 1, 2).float().div(255)
        return (x - self._mean) / self._std
