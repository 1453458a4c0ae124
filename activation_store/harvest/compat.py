"""`ConfiguredViT`, as in the `clipscope` package (0.1.8): the seed's usage example runs with only its
import line changed (`from activation_store.harvest.compat import ConfiguredViT`).

Same signature and defaults as clipscope's — `ConfiguredViT(hook_locations, model_name=
'laion/CLIP-ViT-L-14-laion2B-s32B-b82K', device='cuda')` — and the same preprocessing (HF
CLIPImageProcessor's: the `clipscope` preset), with our own options keyword-only after them."""

from __future__ import annotations

import os

import numpy as np
import torch

from activation_store.errors import ConfigError
from activation_store.harvest.model import LoadedViT, ModelConfig, preprocess_pil
from activation_store.harvest.preprocess import (CLIPSCOPE_HF_REPO, CLIPSCOPE_MODEL, CLIPSCOPE_PRETRAINED,
                                                 PRESET_CHOICES, is_clipscope_hf_repo)


def resolve_model_name(model_name: str, pretrained: str | None) -> dict:
    """ModelConfig settings for clipscope's `model_name`: its HF repo id (bare or `hf-hub:`) is open_clip's
    ViT-L-14 / laion2b_s32b_b82k; other `ORG/REPO` ids are open_clip `hf-hub:` models; anything else is
    what `actstore harvest --model` takes. `pretrained=None` means the weights that name implies."""
    name = str(model_name)
    if is_clipscope_hf_repo(name):
        if pretrained is not None and os.path.isfile(str(pretrained)):  # its weights as a local file
            return {"model": CLIPSCOPE_MODEL, "pretrained": str(pretrained), "preprocess_tag": CLIPSCOPE_PRETRAINED}
        return {"model": CLIPSCOPE_MODEL, "pretrained": CLIPSCOPE_PRETRAINED if pretrained is None else pretrained}
    local = name.endswith(".json") or os.path.exists(name) or name.startswith(("local-dir:", "hf-hub:"))
    if not local and name.count("/") == 1:
        name = f"hf-hub:{name}"
    if name.startswith(("hf-hub:", "local-dir:")):
        return {"model": name, "pretrained": "" if pretrained is None else pretrained}  # the weights come with it
    if pretrained is None:
        if name != CLIPSCOPE_MODEL:
            raise ConfigError(f"ConfiguredViT: model_name {name!r} needs pretrained=TAG (or 'none' for random weights)")
        pretrained = CLIPSCOPE_PRETRAINED
    return {"model": name, "pretrained": pretrained}


class ConfiguredViT:
    """The residual stream of a ViT at `hook_locations` = [(layer, 'resid'), ...].

    `model_name` is clipscope's HF id by default (open_clip's ViT-L-14 / laion2b_s32b_b82k, loaded
    through open_clip), or anything `actstore harvest --model` takes (a tiny config JSON in tests);
    `pretrained` overrides the weights (a tag, a weights file, 'none' for random). Images are
    preprocessed as clipscope's HF processor does (`preprocess='clipscope'`) unless told otherwise."""

    def __init__(self, hook_locations, model_name: str = CLIPSCOPE_HF_REPO, device: str = "cuda", *,
                 pretrained: str | None = None, dtype: str = "fp32", seed: int = 0,
                 preprocess: str = "clipscope") -> None:
        self.locations = [(int(layer), str(kind)) for layer, kind in hook_locations]
        if any(kind != "resid" for _, kind in self.locations):
            raise ConfigError(f"only 'resid' locations exist, got {self.locations}")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"ConfiguredViT: device={device!r} was asked but CUDA is not available; pass device='cpu'")
        if preprocess not in PRESET_CHOICES:
            raise ConfigError(f"ConfiguredViT: preprocess must be one of {', '.join(PRESET_CHOICES)}, got {preprocess!r}")
        self.device = device
        self.vit = LoadedViT(ModelConfig(**resolve_model_name(model_name, pretrained), device=device,
                                         compute_dtype=dtype, seed=seed, preprocess=preprocess),
                             [layer for layer, _ in self.locations])

    @property
    def _hook_locations(self) -> list[tuple[int, str]]:  # clipscope's attribute name
        return self.locations

    def _pixels(self, images) -> torch.Tensor:
        if isinstance(images, torch.Tensor):  # already preprocessed (B, 3, H, W)
            return images.to(self.vit.device, self.vit.dtype)
        if not isinstance(images, (list, tuple)):
            images = [images]
        batch = np.stack([preprocess_pil(self.vit.transform, im) for im in images])
        return self.vit.normalize(torch.from_numpy(batch).to(self.vit.device))

    def all_activations(self, batch) -> dict[tuple[int, str], torch.Tensor]:
        """{(layer, 'resid'): (B, n_tokens, width) float32} for a PIL image, a list of them, or a
        preprocessed pixel tensor."""
        acts = self.vit.activations(self._pixels(batch))
        return {(layer, "resid"): acts[layer].float() for layer, _ in self.locations}

    def cls_activations(self, batch) -> dict[tuple[int, str], torch.Tensor]:
        """{(layer, 'resid'): (B, width)}: the CLS token only."""
        return {loc: a[:, 0] for loc, a in self.all_activations(batch).items()}
