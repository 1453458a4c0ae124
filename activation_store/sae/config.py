"""SAEConfig (the SAE's architecture) and SAEState (an SAE as read from any file format, before it
becomes a module): the common ground of the model, the checkpoint and the format modules."""

from __future__ import annotations

from dataclasses import dataclass, field

from activation_store.configs import check_choice, option
from activation_store.errors import ConfigError

# `openai`: Gao et al.'s TopK SAE (ReLU after the top-k, encoder bias, unit-norm decoder rows, tied
# unit-norm initialisation); `clipscope`: CLIP-Scope's (none of the three, their initialisation).
ARCHS = ("openai", "clipscope")
# what each architecture fixes; None in SAEConfig means "the architecture's value"
ARCH_OPTIONS = {
    "openai": {"relu": True, "encoder_bias": True, "normalize_decoder": True},
    "clipscope": {"relu": False, "encoder_bias": False, "normalize_decoder": False},
}
_WHAT = {"relu": "ReLU after the top-k (its latents may be negative)", "encoder_bias": "encoder bias",
         "normalize_decoder": "decoder normalisation"}


@dataclass
class SAEConfig:
    """A TopK SAE's architecture. `d_in=None` (training only) means the store's d_model.

    `arch` sets relu, encoder_bias and normalize_decoder: those left None take the architecture's
    value; `openai` lets each be switched off, `clipscope` refuses any of them on (ConfigError)."""

    n_latents: int = option(65536, help="number of latents", flag="--latents")
    k: int = option(32, help="active latents per token")
    d_in: int | None = option(None, help="input width (default: the store's d_model)")
    arch: str = option("openai", choices=ARCHS, help="openai: Gao et al.'s TopK SAE and recipe; clipscope: "
                       "CLIP-Scope's (no ReLU, no encoder bias, no decoder normalisation, their initialisation, "
                       "Adam at 9e-5 without schedule or AuxK)")
    # None: the arch's value (the CLI shows the default arch's, openai's)
    relu: bool | None = option(None, help="ReLU after the top-k; --arch clipscope has none (negative latents kept)")
    encoder_bias: bool | None = option(None, help="learn an encoder bias b_enc; --arch clipscope has none")
    normalize_decoder: bool | None = option(None, help="keep decoder rows at unit norm; --arch clipscope does not")

    def __post_init__(self) -> None:
        check_choice("arch", self.arch, ARCHS)
        for name, value in ARCH_OPTIONS[self.arch].items():
            given = getattr(self, name)
            if given is None:
                setattr(self, name, value)
            elif self.arch == "clipscope" and given and not value:
                raise ConfigError(f"arch clipscope has no {_WHAT[name]}: drop {name}=True (--{name.replace('_', '-')}) "
                                  f"or train with --arch openai")
            else:
                setattr(self, name, bool(given))
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
