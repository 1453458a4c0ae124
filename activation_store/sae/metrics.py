"""SAE metrics, computed exactly as CLIP-Scope computed them (formulas in docs/metrics.md), plus
OpenAI's normalised MSE. Every function takes the input `x` and reconstruction `x_hat` (B, d)."""

from __future__ import annotations

import torch


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """CLIP-Scope's MSE: squared error summed over features, averaged over tokens."""
    return (x - x_hat).pow(2).sum(-1).mean()


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """CLIP-Scope's explained variance: per token 1 - ||x - x^||^2 / ||x - mean_features(x)||^2,
    averaged over tokens (the mean is over each token's own features)."""
    delta = (x - x_hat).pow(2).sum(-1)
    variance = (x - x.mean(-1, keepdim=True)).pow(2).sum(-1)
    return (1 - delta / variance).mean()


def nmse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """OpenAI's normalised MSE (fraction of variance unexplained): E||x - x^||^2 / E||x - E[x]||^2,
    the expectation over tokens, E[x] the batch mean vector."""
    return (x - x_hat).pow(2).sum(-1).mean() / (x - x.mean(0, keepdim=True)).pow(2).sum(-1).mean()


def l0(latent: torch.Tensor) -> torch.Tensor:
    """Mean number of latents > 0 per token (CLIP-Scope's definition)."""
    return (latent > 0).sum(-1).float().mean()


def tokenwise_mse(x: torch.Tensor, x_hat: torch.Tensor, token_index: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Per token position (0 = CLS): the summed squared error of each token, averaged over the
    tokens at that position. Positions with no token are NaN."""
    err = (x - x_hat).pow(2).sum(-1).double()
    total = torch.zeros(n_tokens, dtype=torch.float64, device=x.device).index_add_(0, token_index, err)
    count = torch.zeros(n_tokens, dtype=torch.float64, device=x.device).index_add_(
        0, token_index, torch.ones_like(err))
    return total / count


class DeadLatents:
    """Tokens seen since each latent last fired; dead = not fired in the last `window` tokens
    (CLIP-Scope: 10,000,000; its counter resets when the latent is active in a batch)."""

    def __init__(self, n_latents: int, window: int = 10_000_000, device="cpu") -> None:
        self.window = window
        self.since = torch.zeros(n_latents, dtype=torch.int64, device=device)

    def update(self, indices: torch.Tensor, values: torch.Tensor, n_tokens: int, world_size: int = 1) -> None:
        """`n_tokens` per process; with several processes, a latent counts as fired if it fired on any."""
        # counts and masked_fill rather than boolean indexing, which would wait for the device
        counts = torch.zeros(self.since.shape, dtype=torch.int32, device=self.since.device)
        counts.index_add_(0, indices.reshape(-1), (values > 0).reshape(-1).to(torch.int32))
        if world_size > 1:
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MAX)
        self.since += n_tokens * world_size
        self.since.masked_fill_(counts > 0, 0)

    @property
    def dead(self) -> torch.Tensor:
        return self.since >= self.window

    def proportion(self) -> float:
        return float(self.dead.float().mean())

    def state_dict(self) -> dict:
        return {"window": self.window, "since": self.since.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.window = int(state["window"])
        self.since = state["since"].to(self.since.device)


def active_feature_proportion(cls_latents_per_image: torch.Tensor, first: int = 2048, min_images: int = 10) -> float:
    """CLIP-Scope's 'active feature proportion' on CLS tokens, as we define it: among the first
    `first` latents, the share that fire (> 0) on at least `min_images` images of the eval set.
    Takes the (images, n_latents) CLS latents (or their first `first` columns)."""
    lat = cls_latents_per_image[:, :first]
    return float(((lat > 0).sum(0) >= min_images).float().mean())
