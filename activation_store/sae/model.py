"""TopKSAE: the sparse autoencoder of "Scaling and Evaluating Sparse Autoencoders" (Gao et al.,
2024), with the options CLIP-Scope's checkpoints need.

    pre = (x - b_dec) @ W_enc + b_enc
    z   = ReLU(TopK(pre))          (ReLU optional: CLIP-Scope keeps negative top-k values)
    x^  = z @ W_dec + b_dec

Decoder rows are kept at unit norm (`normalize_decoder`), with the gradient component parallel to
them removed before each step. Decoding a top-k code uses `embedding_bag` (a gather and a
weighted sum of k decoder rows), which equals the dense product."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from activation_store.errors import ConfigError


@dataclass
class SAEConfig:
    d_in: int
    n_latents: int
    k: int
    relu: bool = True  # ReLU after top-k (CLIP-Scope: False)
    encoder_bias: bool = True  # CLIP-Scope: False
    normalize_decoder: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.k <= self.n_latents:
            raise ConfigError(f"k must be in [1, n_latents={self.n_latents}], got {self.k}")
        if self.d_in < 1:
            raise ConfigError(f"d_in must be >= 1, got {self.d_in}")


class TopKSAE(nn.Module):
    def __init__(self, d_in: int, n_latents: int, k: int, relu: bool = True, encoder_bias: bool = True,
                 normalize_decoder: bool = True, seed: int | None = None) -> None:
        super().__init__()
        self.cfg = SAEConfig(d_in, n_latents, k, relu, encoder_bias, normalize_decoder)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        w = torch.randn(d_in, n_latents, generator=gen)
        w = w / w.norm(dim=0, keepdim=True)  # unit columns: the decoder starts as the encoder's transpose
        self.W_enc = nn.Parameter(w.clone())
        self.W_dec = nn.Parameter(w.T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(n_latents), requires_grad=encoder_bias)
        self.b_dec = nn.Parameter(torch.zeros(d_in))

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

    @classmethod
    def from_pretrained(cls, checkpoint: str, repo_id: str | None = None, device: str = "cpu") -> TopKSAE:
        """From our checkpoint folder, a SAELens folder, a CLIP-Scope .pt, or a file of a Hugging
        Face repo (`repo_id`)."""
        from activation_store.sae.io import from_pretrained

        return from_pretrained(checkpoint, repo_id, device)
