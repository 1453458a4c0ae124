"""SAE metrics, each computed once, here: streaming reducers that the trainer's logs and the
evaluator both feed batch by batch (formulas in docs/metrics.md; CLIP-Scope's definitions, plus
OpenAI's normalised MSE). The training losses are the same quantities on one batch, built on the
same per-token term."""

from __future__ import annotations

import torch


def token_sq_err(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Each token's squared error summed over features (B,): the term of every metric and loss here."""
    return (x - x_hat).pow(2).sum(-1)


class Reconstruction:
    """MSE, explained variance and NMSE of reconstructions, over any number of batches (B, d).

    mse: CLIP-Scope's: squared error summed over features, averaged over tokens.
    explained_variance: CLIP-Scope's: per token 1 - ||x - x^||^2 / ||x - mean_features(x)||^2,
        averaged over tokens (the mean is over each token's own features).
    nmse: OpenAI's fraction of variance unexplained, E||x - x^||^2 / E||x - E[x]||^2, the
        expectations over tokens, E[x] the mean vector of all tokens seen."""

    def __init__(self) -> None:
        self.tokens = 0
        self.sq_err = 0.0
        self.ev_sum = 0.0
        self.x_sum: torch.Tensor | None = None  # float64 (d,)
        self.x_sq = 0.0

    @torch.no_grad()
    def add(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """Adds a batch; returns each token's squared error (B,), for reducers keyed by token."""
        x, x_hat = x.float(), x_hat.float()
        err = token_sq_err(x, x_hat)
        var = (x - x.mean(-1, keepdim=True)).pow(2).sum(-1)
        xd = x.double()
        s = xd.sum(0)
        self.x_sum = s if self.x_sum is None else self.x_sum + s
        self.x_sq += float(xd.pow(2).sum())
        self.sq_err += float(err.double().sum())
        self.ev_sum += float((1 - err / var).double().sum())
        self.tokens += x.shape[0]
        return err

    @property
    def mse(self) -> float:
        return self.sq_err / self.tokens

    @property
    def explained_variance(self) -> float:
        return self.ev_sum / self.tokens

    @property
    def nmse(self) -> float | None:
        mean = self.x_sum / self.tokens
        total_var = self.x_sq / self.tokens - float(mean.pow(2).sum())
        return self.mse / total_var if total_var > 0 else None

    def result(self) -> dict:
        return {"mse": self.mse, "explained_variance": self.explained_variance, "nmse": self.nmse}


class L0:
    """Mean number of latents > 0 per token (CLIP-Scope's definition), from top-k values (B, k) or a
    dense latent (B, n): both count the same non-zero positive entries."""

    def __init__(self) -> None:
        self.active = 0
        self.tokens = 0

    @torch.no_grad()
    def add(self, values: torch.Tensor) -> None:
        self.active += int((values > 0).sum())
        self.tokens += values.shape[0]

    @property
    def value(self) -> float:
        return self.active / self.tokens


class TokenwiseMSE:
    """Per token position (0 = CLS): the summed squared error of each token, averaged over the
    tokens seen at that position; positions never seen are NaN."""

    def __init__(self, n_tokens: int) -> None:
        self.total = torch.zeros(n_tokens, dtype=torch.float64)
        self.count = torch.zeros(n_tokens, dtype=torch.float64)

    @torch.no_grad()
    def add(self, token_err: torch.Tensor, token_index: torch.Tensor) -> None:
        pos = token_index.to(torch.int64).cpu()
        self.total.index_add_(0, pos, token_err.double().cpu())
        self.count.index_add_(0, pos, torch.ones(pos.shape[0], dtype=torch.float64))

    @property
    def value(self) -> torch.Tensor:
        return self.total / self.count


class Firing:
    """Which latents fired (> 0) on any token, and on how many images' CLS tokens.

    active_feature_proportion: CLIP-Scope's on CLS tokens, as we define it: among the first
    `first` latents, the share that fire on at least `min_images` images."""

    def __init__(self, n_latents: int) -> None:
        self.fired = torch.zeros(n_latents, dtype=torch.bool)
        self.cls_images = torch.zeros(n_latents, dtype=torch.int64)

    @torch.no_grad()
    def add(self, values: torch.Tensor, indices: torch.Tensor, is_cls: torch.Tensor | None = None) -> None:
        """Top-k `values`/`indices` (B, k); `is_cls` marks the rows that are CLS tokens (each of one image)."""
        on = values > 0
        self.fired[indices[on].cpu()] = True
        if is_cls is not None and bool(is_cls.any()):
            cls_on = on[is_cls]
            self.cls_images.index_add_(0, indices[is_cls][cls_on].cpu(),
                                       torch.ones(int(cls_on.sum()), dtype=torch.int64))

    @property
    def never_fired_proportion(self) -> float:
        return float((~self.fired).float().mean())

    def active_feature_proportion(self, first: int = 2048, min_images: int = 10) -> float:
        return float((self.cls_images[:first] >= min_images).float().mean())


# ---------------------------------------------------------------------------- training losses
def mse_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """`Reconstruction.mse` of one batch, differentiable: the trainer's main loss."""
    return token_sq_err(x, x_hat).mean()


def nmse_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """`Reconstruction.nmse` of one batch, differentiable: AuxK's loss."""
    return token_sq_err(x, x_hat).mean() / token_sq_err(x, x.mean(0, keepdim=True)).mean()


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
