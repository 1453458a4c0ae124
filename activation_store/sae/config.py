"""SAEConfig (the SAE's architecture) and SAEState (an SAE as read from any file format, before it
becomes a module): the common ground of the model, the checkpoint and the format modules."""

from __future__ import annotations

from dataclasses import dataclass, field

from activation_store.configs import option
from activation_store.errors import ConfigError


@dataclass
class SAEConfig:
    """A TopK SAE's architecture. `d_in=None` (training only) means the store's d_model."""

    n_latents: int = option(65536, help="number of latents", flag="--latents")
    k: int = option(32, help="active latents per token")
    d_in: int | None = option(None, help="input width (default: the store's d_model)")
    relu: bool = option(True, help="ReLU after the top-k (--no-relu keeps negative values, as CLIP-Scope's SAEs)")
    encoder_bias: bool = option(True, help="learn an encoder bias b_enc (CLIP-Scope: none)")
    normalize_decoder: bool = option(True, help="keep decoder rows at unit norm")

    def __post_init__(self) -> None:
        if not 0 < self.k <= self.n_latents:
            raise ConfigError(f"k must be in [1, n_latents={self.n_latents}], got {self.k}")
        if self.d_in is not None and self.d_in < 1:
            raise ConfigError(f"d_in must be >= 1, got {self.d_in}")


@dataclass
class SAEState:
    """An SAE's weights as a file holds them, in the space it was trained in.

    tensors: W_enc (d, n), W_dec (n, d), b_enc (n), b_dec (d). normalizer: the transform from raw
    activations to that space (None: the SAE takes raw activations). meta: what the file says
    besides (CLIP-Scope's token_count, our training location, ...)."""

    config: SAEConfig
    tensors: dict
    normalizer: object | None = None
    meta: dict = field(default_factory=dict)
