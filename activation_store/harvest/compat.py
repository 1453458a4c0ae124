"""`ConfiguredViT`, as in the `clipscope` package: the seed's usage example runs with only its
import line changed (`from activation_store.harvest.compat import ConfiguredViT`)."""

from __future__ import annotations

import numpy as np
import torch

from activation_store.errors import ConfigError
from activation_store.harvest.model import DEFAULT_MODEL, DEFAULT_PRETRAINED, LoadedViT, ModelConfig, preprocess_pil


class ConfiguredViT:
    """The residual stream of an open_clip ViT at `locations` = [(layer, 'resid'), ...].

    Defaults to ViT-L-14 / laion2b_s32b_b82k like clipscope; `model_name` and `pretrained` take
    anything `actstore harvest --model/--pretrained` takes (a tiny config JSON and 'none' in tests)."""

    def __init__(self, locations, device: str = "cpu", model_name: str = DEFAULT_MODEL,
                 pretrained: str = DEFAULT_PRETRAINED, dtype: str = "fp32", seed: int = 0) -> None:
        self.locations = [(int(layer), str(kind)) for layer, kind in locations]
        if any(kind != "resid" for _, kind in self.locations):
            raise ConfigError(f"only 'resid' locations exist, got {self.locations}")
        self.device = device
        self.vit = LoadedViT(ModelConfig(model=model_name, pretrained=pretrained, device=device, compute_dtype=dtype,
                                         seed=seed), [layer for layer, _ in self.locations])

    def _pixels(self, images) -> torch.Tensor:
        if isinstance(images, torch.Tensor):  # already preprocessed (B, 3, H, W)
            return images.to(self.vit.device, self.vit.dtype)
        if not isinstance(images, (list, tuple)):
            images = [images]
        batch = np.stack([preprocess_pil(self.vit.transform, im) for im in images])
        return self.vit.normalize(torch.from_numpy(batch).to(self.vit.device))

    def all_activations(self, images) -> dict[tuple[int, str], torch.Tensor]:
        """{(layer, 'resid'): (B, n_tokens, width) float32} for a PIL image, a list of them, or a
        preprocessed pixel tensor."""
        acts = self.vit.activations(self._pixels(images))
        return {(layer, "resid"): acts[layer].float() for layer, _ in self.locations}

    def cls_activations(self, images) -> dict[tuple[int, str], torch.Tensor]:
        """{(layer, 'resid'): (B, width)}: the CLS token only."""
        return {loc: a[:, 0] for loc, a in self.all_activations(images).items()}
