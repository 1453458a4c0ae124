"""TopKSAE: the sparse autoencoder of "Scaling and Evaluating Sparse Autoencoders" (Gao et al.,
2024), with the options CLIP-Scope's checkpoints need.

    pre = (x - b_dec) @ W_enc + b_enc
    z   = ReLU(TopK(pre))          (ReLU optional: CLIP-Scope keeps negative top-k values)
    x^  = z @ W_dec + b_dec

Decoder rows are kept at unit norm (`normalize_decoder`), with the gradient component parallel to
them removed before each step. Decoding a top-k code uses `embedding_bag` (a gather and a
weighted sum of k decoder rows), which equals the dense product.

Loading (`load_sae`, `TopKSAE.from_pretrained`) gives an SAE on **raw** store activations: the
normaliser a run trained behind is folded into the weights (exact; see `io.fold_tensors`).
`normalized=True` gives the SAE in its training space instead, with the normaliser beside it
(`sae.normalizer`) for those who apply it themselves."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from activation_store.errors import CheckpointError, ConfigError
from activation_store.sae import checkpoint, io, saelens
from activation_store.sae.config import ARCHS, SAEConfig, SAEState


class TopKSAE(nn.Module):
    def __init__(self, d_in: int, n_latents: int, k: int, seed: int | None = None, init: str | None = None,
                 **options) -> None:
        """`options`: SAEConfig's other fields (arch, relu, encoder_bias, normalize_decoder).

        `init` (default: the arch's): `openai` draws W_enc with unit-norm columns, W_dec = W_enc^T,
        zero biases; `clipscope` draws as CLIP-Scope's SAE does, in its order: b_dec (their pre_b)
        = randn(d) * 0.01, then W_enc = randn(d, n) / sqrt(2) / sqrt(d), W_dec = W_enc^T, b_enc = 0.
        `seed` seeds a generator of its own (the same numbers as `torch.manual_seed(seed)` and
        their constructor on the CPU); without one, torch's global generator draws."""
        super().__init__()
        self.cfg = SAEConfig(n_latents=n_latents, k=k, d_in=d_in, **options)
        init = init or self.cfg.arch
        if init not in ARCHS:
            raise ConfigError(f"init must be one of {', '.join(ARCHS)}, got {init!r}")
        encoder_bias = self.cfg.encoder_bias
        self.input_space = "raw"  # or "normalized": the SAE expects normaliser.apply(x)
        self.normalizer = None  # the normaliser of its training run, when known
        self.meta: dict = {}  # what its file said besides the weights
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        if init == "clipscope":
            b_dec = torch.randn(d_in, generator=gen) * 0.01
            w = torch.randn(d_in, n_latents, generator=gen) / (2**0.5) / (d_in**0.5)
        else:
            b_dec = torch.zeros(d_in)
            w = torch.randn(d_in, n_latents, generator=gen)
            w = w / w.norm(dim=0, keepdim=True)  # unit columns: the decoder starts as the encoder's transpose
        self.W_enc = nn.Parameter(w.clone())
        self.W_dec = nn.Parameter(w.T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(n_latents), requires_grad=encoder_bias)
        self.b_dec = nn.Parameter(b_dec)

    @property
    def k(self) -> int:
        return self.cfg.k

    # ------------------------------------------------------------------ encode / decode
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        if self.b_dec.requires_grad and torch.is_grad_enabled():
            # b_dec's gradient through the encoder is -sum_batch(dL/dpre) @ W_enc^T; written as
            # (x - b_dec) @ W_enc, autograd would get it from a full (batch x n x d) product, a
            # third of the step. The added term is exactly zero and carries that gradient cheaply.
            # It joins b_enc as one (n,) vector, so the batch sees a single broadcast add.
            zero = self.b_dec - self.b_dec.detach()
            bias = (self.b_enc if self.cfg.encoder_bias else 0) - zero @ self.W_enc
            return (x - self.b_dec.detach()) @ self.W_enc + bias
        pre = (x - self.b_dec) @ self.W_enc
        return pre + self.b_enc if self.cfg.encoder_bias else pre

    def encode_topk(self, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values (B, k), indices (B, k), pre-activations (B, n))."""
        pre = self.pre_activations(x)
        values, indices = pre.topk(k or self.cfg.k, dim=-1, sorted=False)
        if self.cfg.relu:
            values = F.relu(values)
        return values, indices, pre

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The dense latent (B, n_latents): top-k values scattered, zeros elsewhere."""
        values, indices, _ = self.encode_topk(x)
        return torch.zeros(x.shape[0], self.cfg.n_latents, dtype=values.dtype, device=x.device).scatter_(
            -1, indices, values)

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """sum_j values[:, j] * W_dec[indices[:, j]] (+ b_dec), without the dense latent."""
        out = F.embedding_bag(indices, self.W_dec, per_sample_weights=values.to(self.W_dec.dtype), mode="sum")
        return out + self.b_dec if bias else out

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Dense decode of a (B, n_latents) latent."""
        return latent @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, indices, _ = self.encode_topk(x)
        return self.decode_sparse(values, indices)

    def forward_verbose(self, x: torch.Tensor) -> dict:
        """CLIP-Scope's keys (`latent`, `reconstruction`, `active_latents`, and its always-None
        `experts_chosen`, `expert_prop`, `expert_weighting`) plus ours (`topk_values`,
        `topk_indices`, `pre_activations`)."""
        values, indices, pre = self.encode_topk(x)
        latent = torch.zeros(x.shape[0], self.cfg.n_latents, dtype=values.dtype, device=x.device).scatter_(
            -1, indices, values)
        return {
            "latent": latent,
            "reconstruction": self.decode_sparse(values, indices),
            "active_latents": latent.max(dim=0).values > 1e-3,
            "experts_chosen": None,
            "expert_prop": None,
            "expert_weighting": None,
            "topk_values": values,
            "topk_indices": indices,
            "pre_activations": pre,
        }

    # ------------------------------------------------------------------ the decoder's geometry
    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        if self.cfg.normalize_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_gradient_(self) -> None:
        """Drop the part of W_dec's gradient along each (unit) decoder row, which would only change
        the row's norm, before the optimiser step."""
        if self.cfg.normalize_decoder and self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
            self.W_dec.grad -= parallel * self.W_dec

    @torch.no_grad()
    def init_b_dec_(self, sample: torch.Tensor, iterations: int = 50) -> None:
        """b_dec from data: the geometric median of a sample (Weiszfeld's iterations), as Gao et al."""
        x = sample.float()
        median = x.mean(0)
        for _ in range(iterations):
            w = 1.0 / (x - median).norm(dim=1).clamp_min(1e-6)
            new = (w[:, None] * x).sum(0) / w.sum()
            if (new - median).norm() < 1e-6 * median.norm().clamp_min(1e-6):
                median = new
                break
            median = new
        self.b_dec.copy_(median.to(self.b_dec.dtype))

    def config_dict(self) -> dict:
        return asdict(self.cfg)

    @property
    def clipscope_meta(self) -> dict:
        return self.meta.get("clipscope", {})

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_config(cls, config: SAEConfig, seed: int | None = None, init: str | None = None) -> TopKSAE:
        """A fresh SAE of `config`, initialised as its arch's (or `init`'s) recipe, seeded by `seed`."""
        if config.d_in is None:
            raise CheckpointError("the SAE's d_in is unknown; give SAEConfig(d_in=...)")
        c = config
        return cls(c.d_in, c.n_latents, c.k, seed=seed, init=init, arch=c.arch, relu=c.relu,
                   encoder_bias=c.encoder_bias, normalize_decoder=c.normalize_decoder)

    @classmethod
    def from_state(cls, state: SAEState, device="cpu", normalized: bool = False) -> TopKSAE:
        """A module from weights read from a file: on raw activations (the normaliser folded in),
        or, with `normalized=True`, in the space it was trained in."""
        fold = not normalized and state.normalizer is not None and state.normalizer.mode != "none"
        config = SAEConfig(**{**asdict(state.config), "normalize_decoder": state.config.normalize_decoder and not fold})
        sae = cls.from_config(config)
        tensors = io.fold_tensors(state.tensors, state.normalizer) if fold else state.tensors
        try:
            sae.load_state_dict({k: tensors[k] for k in io.TENSORS})
        except (KeyError, RuntimeError) as exc:
            raise CheckpointError(f"weights do not fit a TopK SAE of {asdict(state.config)}: {exc}") from exc
        sae.input_space = "normalized" if normalized and state.normalizer is not None else "raw"
        sae.normalizer, sae.meta = state.normalizer, dict(state.meta)
        return sae.to(device)

    def folded(self, normalizer) -> TopKSAE:
        """This SAE (trained on normalised activations) as one on raw activations."""
        state = SAEState(self.cfg, {k: v.detach() for k, v in self.state_dict().items()}, normalizer, self.meta)
        return TopKSAE.from_state(state)

    @classmethod
    def from_pretrained(cls, checkpoint: str, repo_id: str | None = None, device: str = "cpu",
                        normalized: bool = False) -> TopKSAE:
        """From a run or checkpoint folder of ours, a SAELens folder, a CLIP-Scope .pt, or a file of a
        Hugging Face repo (`repo_id`; without one, a name that is not a local path is looked up in
        CLIP-Scope's repo, as their model card does: `from_pretrained("22_resid/1200013184.pt")`)."""
        if repo_id is None and Path(checkpoint).exists():
            return load_sae(checkpoint, device, normalized)
        return load_sae(io.hub_file(checkpoint, repo_id), device, normalized)


def read_state(path: str | Path) -> SAEState:
    """The SAEState of any SAE file or folder we read."""
    p = Path(path)
    ckpt = checkpoint.resolve(p)
    if ckpt is not None:
        return checkpoint.read_sae_state(ckpt)
    if p.is_file() and p.suffix == ".pt":
        return io.read_clipscope(p)
    if saelens.is_saelens(p):
        return saelens.read_saelens(p)
    raise CheckpointError(
        f"{path} is neither an activation-store run or checkpoint folder, a SAELens folder "
        f"(sae_weights.safetensors + cfg.json) nor a CLIP-Scope .pt file"
    )


def load_sae(path: str | Path, device: str = "cpu", normalized: bool = False) -> TopKSAE:
    """An SAE from one of our run or checkpoint folders, a SAELens folder, or a CLIP-Scope .pt file,
    on raw activations unless `normalized` (see the module docstring)."""
    return TopKSAE.from_state(read_state(path), device, normalized)


def load_clipscope(path: str | Path, device: str = "cpu") -> TopKSAE:
    """A TopKSAE computing exactly CLIP-Scope's forward for a checkpoint of theirs."""
    return TopKSAE.from_state(io.read_clipscope(path), device)


def _raw(sae: TopKSAE, normalizer) -> TopKSAE:
    """The SAE on raw activations: a normalised-space one folded with `normalizer` (or its own)."""
    normalizer = normalizer if normalizer is not None else (sae.normalizer if sae.input_space == "normalized" else None)
    return sae.folded(normalizer) if normalizer is not None and normalizer.mode != "none" else sae


def export_saelens(sae: TopKSAE, folder: str | Path, normalizer=None, hook_name: str = "",
                   model_name: str = "") -> Path:
    """SAELens 6.x's layout of an SAE on raw activations: a normalised-space SAE is folded with
    `normalizer` (or its own) first, as SAELens itself does at save. Refuses (CheckpointError) an
    SAE without the ReLU after its top-k, which SAELens cannot represent."""
    raw = _raw(sae, normalizer)
    tensors = {k: v.detach() for k, v in raw.state_dict().items()}
    return saelens.write_saelens(tensors, raw.cfg, folder, hook_name, model_name)


def export_clipscope(sae: TopKSAE, path: str | Path, normalizer=None, meta: dict | None = None) -> Path:
    """CLIP-Scope's `.pt` layout of an SAE on raw activations (folded as `export_saelens` does);
    `meta` (default: the SAE's own, e.g. a CLIP-Scope checkpoint's token_count) fills their
    trainer's fields. Refuses an SAE with a ReLU or a nonzero encoder bias (`io.write_clipscope`)."""
    raw = _raw(sae, normalizer)
    tensors = {k: v.detach() for k, v in raw.state_dict().items()}
    return io.write_clipscope(tensors, raw.cfg, path, sae.meta if meta is None else meta)
