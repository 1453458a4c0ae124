"""Training a TopKSAE on a store: the OpenAI recipe (Adam, warm-up then linear decay, AuxK for dead
latents, unit-norm decoder), with checkpoints that resume exactly.

A checkpoint (`OUT/checkpoints/<tokens>/`) holds the weights (safetensors), the optimiser, the
dead-latent counters, the step, the reader's state and the normalisation. It is written to a
temporary folder and renamed, so a killed run never leaves a half checkpoint; rerunning the same
command continues from the newest one and, on the CPU, ends with the same weights as a run that
was never interrupted."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from activation_store.errors import ConfigError
from activation_store.readers import ShuffledReader
from activation_store.sae import metrics
from activation_store.sae.model import TopKSAE
from activation_store.store import open_store


@dataclass
class TrainerConfig:
    store: str
    location: str
    out: str
    tokens: object = "all"
    n_latents: int = 65536
    k: int = 32
    relu: bool = True
    batch_size: int = 4096
    total_tokens: int = 1_200_000_000
    lr: float | None = None  # None: 2e-4 / sqrt(n_latents / 2**14) (scales with latent count)
    warmup_tokens: int = 10_000_000
    decay_start: float = 0.8  # linear decay to 0 over the last 20% of training
    auxk_coef: float = 1 / 32
    k_aux: int | None = None  # None: d_in // 2
    dead_tokens: int = 10_000_000  # a latent silent this long is dead (AuxK and the metric)
    checkpoint_every_tokens: int = 100_000_000
    log_every_steps: int = 50
    normalize: str = "unit_mean_sq_norm"
    holdout: float = 0.05  # share of images kept out of training for evaluation (split by image)
    seed: int = 0
    device: str = "cpu"
    autocast: str = "auto"  # auto: bf16 autocast on CUDA, none on the CPU; bf16: on any device; off
    buffer_tokens: int = 2**19
    threads: int = 4
    wandb: bool = False
    storage_options: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict) -> TrainerConfig:
        """From a config file's values merged with flags; says which required ones are missing."""
        missing = [name for name in ("store", "location", "out") if values.get(name) is None]
        if missing:
            raise ConfigError(f"training needs {', '.join(missing)} (as arguments or in --config)")
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"bad training configuration: {exc}") from exc

    def autocast_context(self):
        """The encoder and losses run under bf16 autocast; weights, Adam and the decoder's
        embedding_bag stay float32."""
        if self.autocast not in ("auto", "bf16", "off"):
            raise ConfigError(f"autocast must be auto, bf16 or off, got {self.autocast!r}")
        device_type = torch.device(self.device).type
        on = self.autocast == "bf16" or (self.autocast == "auto" and device_type == "cuda")
        return torch.autocast(device_type, dtype=torch.bfloat16) if on else contextlib.nullcontext()

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.n_latents / 2**14)


def run_checkpoints(out: str | Path) -> list[Path]:
    """The complete checkpoints of a run folder, oldest first (a renamed folder is complete)."""
    root = Path(out) / "checkpoints"
    return sorted(p for p in root.glob("[0-9]*") if (p / "trainer.pt").exists()) if root.is_dir() else []


def lr_at(cfg: TrainerConfig, tokens: int) -> float:
    base = cfg.learning_rate()
    if cfg.warmup_tokens and tokens < cfg.warmup_tokens:
        return base * (tokens + cfg.batch_size) / cfg.warmup_tokens
    start = cfg.decay_start * cfg.total_tokens
    if tokens >= start and cfg.decay_start < 1:
        return base * max(0.0, (cfg.total_tokens - tokens) / (cfg.total_tokens - start))
    return base


def auxk_loss(sae: TopKSAE, x: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor,
              k_aux: int) -> torch.Tensor:
    """Reconstruct the residual x - x^ from the top-k_aux pre-activations of dead latents, as a
    normalised MSE (Gao et al.), scaled down while fewer than k_aux latents are dead."""
    dead_idx = dead.nonzero().squeeze(1)
    n_dead = dead_idx.numel()
    if n_dead == 0:
        return x.new_zeros(())
    # top-k over the dead columns only: masking all n columns and searching them costs as much as
    # the whole SAE step when n is large and few latents are dead
    values, pos = pre.index_select(1, dead_idx).topk(min(k_aux, n_dead), dim=-1, sorted=False)
    indices = dead_idx[pos]
    values = F.relu(values) if sae.cfg.relu else values
    residual = (x - x_hat).detach()
    recon = sae.decode_sparse(values, indices, bias=False)
    scale = min(n_dead / k_aux, 1.0)
    return scale * metrics.nmse(residual, recon)


def sae_step(sae: TopKSAE, opt: torch.optim.Optimizer, x: torch.Tensor, dead: metrics.DeadLatents, k_aux: int,
             auxk_coef: float, autocast=contextlib.nullcontext(), world: int = 1,
             aux_dead: torch.Tensor | None = None) -> dict:
    """One training step: encode, sparse decode, MSE + AuxK, backward (gradients averaged over
    `world` processes), step, decoder renormalisation, dead counters. `aux_dead` replaces the
    counters' dead mask for AuxK (benchmarks fix it to time AuxK at a chosen dead fraction)."""
    with autocast:
        values, indices, pre = sae.encode_topk(x)
        x_hat = sae.decode_sparse(values, indices)
        loss_main = metrics.mse(x, x_hat)
        dead_mask = dead.dead if aux_dead is None else aux_dead
        aux = auxk_loss(sae, x, x_hat, pre, dead_mask, k_aux) if auxk_coef else x.new_zeros(())
        loss = loss_main + auxk_coef * aux
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if world > 1:  # average gradients: every rank then takes the same step
        for p in sae.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= world
    sae.remove_parallel_gradient_()
    opt.step()
    sae.normalize_decoder_()
    dead.update(indices, values.detach(), x.shape[0], world)
    return {"values": values, "x_hat": x_hat, "mse": loss_main, "auxk": aux, "loss": loss}


class Trainer:
    def __init__(self, cfg: TrainerConfig) -> None:
        self.cfg = cfg
        self.rank, self.world = _init_distributed(cfg)
        torch.manual_seed(cfg.seed)
        self.store = open_store(cfg.store, cfg.storage_options or None)
        self.reader = ShuffledReader(self.store, cfg.location, tokens=cfg.tokens, batch_size=cfg.batch_size,
                                     buffer_tokens=cfg.buffer_tokens, seed=cfg.seed, epochs=None, device=cfg.device,
                                     normalize=cfg.normalize, drop_last=True, threads=cfg.threads,
                                     split="train" if cfg.holdout else "all", holdout=cfg.holdout or 0.05)
        d = self.store.d_model
        self.sae = TopKSAE(d, cfg.n_latents, cfg.k, relu=cfg.relu, seed=cfg.seed).to(cfg.device)
        self.k_aux = cfg.k_aux or d // 2
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=cfg.learning_rate())
        self.dead = metrics.DeadLatents(cfg.n_latents, cfg.dead_tokens, device=cfg.device)
        self.step, self.tokens = 0, 0
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.resumed_from = self._resume()

    # ------------------------------------------------------------------ checkpoints
    def checkpoints(self) -> list[Path]:
        return run_checkpoints(self.out)

    def save_checkpoint(self) -> Path:
        """Rank 0 writes weights, optimiser and counters (identical on every rank); each rank writes
        its own reader state; rank 0 renames the folder once all are written."""
        root = self.out / "checkpoints"
        final = root / f"{self.tokens:013d}"
        tmp = root / f".tmp-{self.tokens:013d}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier(self.world)
        torch.save({"reader": self.reader.state_dict()}, tmp / f"reader_rank{self.rank}.pt")
        if self.rank == 0:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.sae.state_dict().items()},
                      str(tmp / "sae.safetensors"))
            torch.save({"optimizer": self.opt.state_dict(), "dead": self.dead.state_dict(), "step": self.step,
                        "tokens": self.tokens, "world_size": self.world,
                        "normalizer": self.reader.normalizer.state_dict()}, tmp / "trainer.pt")
            (tmp / "config.json").write_text(json.dumps({
                "sae": self.sae.config_dict(), "world_size": self.world,
                "trainer": asdict(self.cfg) | {"storage_options": sorted(self.cfg.storage_options)},
                "location": self.cfg.location, "store": self.store.url,
                "normalizer": {k: v for k, v in self.reader.normalizer.state_dict().items() if k in ("mode", "source")},
            }, indent=2, default=str))
        _barrier(self.world)
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        _barrier(self.world)
        return final

    def _resume(self) -> Path | None:
        found = self.checkpoints()
        if not found:
            return None
        path = found[-1]
        self.sae.load_state_dict(load_file(str(path / "sae.safetensors"), device=str(self.cfg.device)))
        state = torch.load(path / "trainer.pt", map_location=self.cfg.device, weights_only=True)
        if state.get("world_size", 1) != self.world:
            raise ConfigError(f"{path} was written by {state.get('world_size', 1)} processes; resume it with as many "
                              f"(this run has {self.world})")
        self.opt.load_state_dict(state["optimizer"])
        self.dead.load_state_dict(state["dead"])
        self.step, self.tokens = state["step"], state["tokens"]
        reader = torch.load(path / f"reader_rank{self.rank}.pt", map_location="cpu", weights_only=True)
        self.reader.load_state_dict(reader["reader"])
        return path

    # ------------------------------------------------------------------ training
    def train(self) -> dict:
        cfg = self.cfg
        it = iter(self.reader)
        log = open(self.out / "metrics.jsonl", "a")
        progress = tqdm(total=cfg.total_tokens, initial=self.tokens, unit="tok", unit_scale=True, desc="train")
        next_ckpt = (self.tokens // cfg.checkpoint_every_tokens + 1) * cfg.checkpoint_every_tokens
        wandb = _wandb(cfg) if cfg.wandb else None
        t0 = time.perf_counter()
        last = {}
        autocast = cfg.autocast_context()
        while self.tokens < cfg.total_tokens:
            x = next(it)
            if self.step == 0 and self.resumed_from is None:
                self.sae.init_b_dec_(x)
                if self.world > 1:  # every rank starts from rank 0's b_dec
                    torch.distributed.broadcast(self.sae.b_dec.data, 0)
            for group in self.opt.param_groups:
                group["lr"] = lr_at(cfg, self.tokens)
            out = sae_step(self.sae, self.opt, x, self.dead, self.k_aux, cfg.auxk_coef, autocast, self.world)
            values, x_hat, loss_main, aux, loss = out["values"], out["x_hat"], out["mse"], out["auxk"], out["loss"]
            self.step += 1
            self.tokens += x.shape[0] * self.world
            progress.update(x.shape[0] * self.world)
            if self.step % cfg.log_every_steps == 0 or self.tokens >= cfg.total_tokens:
                with torch.no_grad():
                    last = {"step": self.step, "tokens": self.tokens, "loss": float(loss), "mse": float(loss_main),
                            "auxk": float(aux), "explained_variance": float(metrics.explained_variance(x, x_hat)),
                            "nmse": float(metrics.nmse(x, x_hat)), "l0": float((values > 0).sum(-1).float().mean()),
                            "dead_proportion": self.dead.proportion(), "lr": self.opt.param_groups[0]["lr"],
                            "tokens_per_s": (self.tokens - (progress.initial or 0)) / (time.perf_counter() - t0)}
                if self.rank == 0:
                    log.write(json.dumps(last) + "\n")
                    log.flush()
                if wandb is not None and self.rank == 0:
                    wandb.log(last, step=self.step)
            if self.tokens >= next_ckpt:
                self.save_checkpoint()
                next_ckpt += cfg.checkpoint_every_tokens
        final = self.save_checkpoint()
        progress.close()
        log.close()
        self.reader.close()
        in_sync = _ranks_in_sync(self.sae, self.world)
        if not in_sync:
            raise RuntimeError("SAE weights differ between ranks after training")
        return {"checkpoint": str(final), "steps": self.step, "tokens": self.tokens, "last": last,
                "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                "rank": self.rank, "world_size": self.world, "ranks_in_sync": in_sync}


def _init_distributed(cfg: TrainerConfig) -> tuple[int, int]:
    """torchrun sets WORLD_SIZE/RANK: join the process group (gloo on CPU, nccl on CUDA)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if str(cfg.device).startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            cfg.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _ranks_in_sync(sae: TopKSAE, world: int) -> bool:
    if world == 1:
        return True
    flat = torch.cat([p.detach().flatten().double().cpu() for p in sae.parameters()])
    sums = torch.tensor([float(flat.sum()), float((flat * torch.arange(len(flat), dtype=torch.float64)).sum())])
    gathered = [torch.zeros_like(sums) for _ in range(world)]
    torch.distributed.all_gather(gathered, sums)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _wandb(cfg: TrainerConfig):
    try:
        import wandb
    except ImportError as exc:
        raise ConfigError("--wandb needs the wandb package: pip install wandb") from exc
    wandb.init(project="activation-store", config=asdict(cfg))
    return wandb


def train(cfg: TrainerConfig) -> dict:
    return Trainer(cfg).train()
