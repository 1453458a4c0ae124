"""Normalisation from the store's own statistics, as an explicit transform that an SAE checkpoint
can save and apply at inference (CLIP-Scope standardised each batch by its own statistics and kept
none of them; we do not)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from activation_store.configs import check_choice
from activation_store.errors import NoDataError
from activation_store.readers.config import NORMALIZE_MODES


@dataclass
class Normalizer:
    """y = (x - shift) * scale, per channel; the inverse is x = y / scale + shift.

    none: shift 0, scale 1.
    standardize: shift = per-channel mean, scale = 1 / per-channel std (population), from the store.
    unit_mean_sq_norm: shift 0, scale = sqrt(d_model / E||x||^2), so E||y||^2 = d_model (SAELens's
        'expected average' normalisation).
    """

    mode: str
    shift: np.ndarray  # (d,) float64
    scale: np.ndarray  # (d,) float64
    source: dict  # where the statistics came from (store, location, token group, count)

    @classmethod
    def from_moments(cls, mode: str, moments, source: dict | None = None, eps: float = 1e-6) -> Normalizer:
        d = moments.d
        check_choice("normalize", mode, NORMALIZE_MODES)
        if mode != "none" and moments.count == 0:
            raise NoDataError("the store has no statistics for these tokens yet (no committed shard)")
        if mode == "none":
            shift, scale = np.zeros(d), np.ones(d)
        elif mode == "standardize":
            shift, scale = moments.mean.copy(), 1.0 / (np.sqrt(moments.var) + eps)
        else:
            shift, scale = np.zeros(d), np.full(d, np.sqrt(d / moments.mean_sq_norm))
        return cls(mode, shift, scale, dict(source or {}))

    @classmethod
    def from_store(cls, mode: str, store, location: str, stats_group: str = "all") -> Normalizer:
        """From the store's statistics of one location and token group (none reads no statistics)."""
        from activation_store.store.stats import Moments

        moments = Moments(store.d_model) if mode == "none" else store.stats(location, stats_group)
        return cls.from_moments(mode, moments, {"store": store.url, "location": location, "tokens": stats_group,
                                                "count": moments.count})

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return x
        shift, scale = self._tensors(x)
        return (x - shift) * scale

    def apply_(self, x: torch.Tensor) -> torch.Tensor:
        """`apply` in place (x float32): what the readers' gather threads do to each block."""
        if self.mode == "none":
            return x
        shift, scale = self._tensors(x)
        return x.sub_(shift).mul_(scale)

    def float32_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(shift, scale) as the float32 values `apply_` computes with (for the readers' fused gather)."""
        shift, scale = self._tensors(torch.empty(0, dtype=torch.float32))
        return shift.numpy(), scale.numpy()

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return y
        shift, scale = self._tensors(y)
        return y / scale + shift

    def _tensors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (x.device, x.dtype)
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            cache[key] = (torch.as_tensor(self.shift, dtype=x.dtype, device=x.device),
                          torch.as_tensor(self.scale, dtype=x.dtype, device=x.device))
        return cache[key]

    def state_dict(self) -> dict:
        return {"mode": self.mode, "shift": torch.as_tensor(self.shift), "scale": torch.as_tensor(self.scale),
                "source": dict(self.source)}

    @classmethod
    def from_state_dict(cls, state: dict) -> Normalizer:
        return cls(state["mode"], np.asarray(state["shift"], dtype=np.float64),
                   np.asarray(state["scale"], dtype=np.float64), dict(state.get("source", {})))
