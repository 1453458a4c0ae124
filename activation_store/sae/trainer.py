"""Training a TopKSAE on a store: the OpenAI recipe (Adam, warm-up then linear decay, AuxK for dead
latents, unit-norm decoder) or, with `--arch clipscope`, CLIP-Scope's (their initialisation, Adam
at a constant 9e-5, no AuxK, no decoder normalisation), with checkpoints (sae/checkpoint.py) that resume exactly: rerunning
the same command continues from the newest one and, on the CPU, ends with the same weights as a
run that was never interrupted. Under torchrun, gradients are averaged by torch's
DistributedDataParallel (bucketed all-reduce, overlapped with the backward)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from activation_store import faults
from activation_store.distributed import launched_by_torchrun, resolve_rank
from activation_store.configs import as_dict, check_choice, deep_merge, from_dict, option, redacted
from activation_store.errors import CheckpointError, ConfigError, DistributedError
from activation_store.readers import ReaderConfig, ShuffledReader
from activation_store.sae import checkpoint, metrics
from activation_store.sae.config import SAEConfig
from activation_store.sae.model import TopKSAE
from activation_store.store import open_store

AUTOCAST_MODES = ("auto", "bf16", "off")
# how the trainer reads, whatever the reader config says: forever, shuffled, whole batches (DDP needs
# equal batch counts per rank), the training images, float32 batches, ranks from the process group
_TRAINING_READS = {"epochs": None, "shuffle": True, "drop_last": True, "return_ids": False, "split": "train",
                   "dtype": "float32", "rank": None, "world_size": None}
# flat keys of 0.1 config files, now in the nested reader / sae tables
_LEGACY_READER_KEYS = ("location", "tokens", "batch_size", "buffer_tokens", "threads", "normalize", "holdout",
                       "seed", "device")
_LEGACY_SAE_KEYS = {"n_latents": "n_latents", "k": "k", "relu": "relu"}  # 0.1 name -> SAEConfig field
# each architecture's recipe: the values TrainerConfig's fields left None take (lr: learning_rate())
RECIPES = {
    "openai": {"warmup_tokens": 10_000_000, "decay_start": 0.8, "auxk_coef": 1 / 32, "init_b_dec": True},
    "clipscope": {"warmup_tokens": 0, "decay_start": 1.0, "auxk_coef": 0.0, "init_b_dec": False},
}
CLIPSCOPE_LR = 9e-5


def _training_reader() -> ReaderConfig:
    return ReaderConfig(normalize="unit_mean_sq_norm", **_TRAINING_READS)


def _is_positive(x) -> bool:
    return math.isfinite(x) and x > 0


@dataclass
class TrainerConfig:
    """A training run. `reader` says what is read (location, tokens, batch size, normalisation,
    held-out share, device, seed); `sae` the architecture; the rest the optimisation.

    The trainer fixes how it reads (`_TRAINING_READS`): a reader config that leaves those fields at
    ReaderConfig's defaults gets the trainer's values; one that sets them otherwise is refused."""

    store: str | None = option(None, help="store path or URL", positional=True)
    out: str | None = option(None, help="run folder: checkpoints/, metrics.jsonl")
    reader: ReaderConfig = option(default_factory=_training_reader, help="what is read")
    # a table until __post_init__ builds the SAEConfig: merged into a built default, its resolved
    # relu/encoder_bias/normalize_decoder would read as given and contradict --arch clipscope
    sae: SAEConfig = option(default_factory=dict, help="the SAE's architecture")
    total_tokens: int = option(1_200_000_000, help="tokens to train on")
    lr: float | None = option(None, help="learning rate (default: 2e-4 / sqrt(latents / 2^14); --arch "
                              "clipscope: 9e-5)")
    warmup_tokens: int | None = option(None, help="linear learning-rate warm-up (default: 10000000; --arch "
                                       "clipscope: 0)")
    decay_start: float | None = option(None, help="share of training after which the learning rate decays "
                                       "linearly to 0 (default: 0.8; --arch clipscope: 1, no decay)")
    auxk_coef: float | None = option(None, help="weight of the AuxK loss, 0: off (default: 1/32; --arch "
                                     "clipscope: 0)")
    init_b_dec: bool | None = option(None, help="start b_dec at the geometric median of the first batch "
                                     "(default: on; --arch clipscope keeps pre_b from its initialisation)")
    k_aux: int | None = option(None, help="dead latents AuxK uses per token (default: d_in / 2)")
    dead_tokens: int = option(10_000_000, help="a latent silent this many tokens is dead (AuxK and the metric)")
    checkpoint_every_tokens: int = option(100_000_000, help="tokens between checkpoints", flag="--checkpoint-every")
    log_every_steps: int = option(50, help="steps between lines of metrics.jsonl")
    autocast: str = option("auto", help="bf16 autocast: auto = on CUDA only", choices=AUTOCAST_MODES)
    wandb: bool = option(False, help="also log to Weights & Biases")
    storage_options: dict = option(default_factory=dict, help="fsspec options of a remote store", cli=False)

    # reader settings the trainer decides itself: not offered as flags
    CLI_EXCLUDE: ClassVar[frozenset] = frozenset(f"reader.{k}" for k in _TRAINING_READS)

    @classmethod
    def upgrade_legacy(cls, values: dict) -> dict:
        """0.1 config files put the reader's and the SAE's settings at the top level: nest them
        (a nested value, from the file or a flag, wins over a flat one)."""
        values = dict(values)
        for table, keys in (("reader", {k: k for k in _LEGACY_READER_KEYS}), ("sae", _LEGACY_SAE_KEYS)):
            flat = {name: values.pop(key) for key, name in keys.items() if key in values}
            if flat:
                nested = values.get(table)
                values[table] = {**flat, **(nested if isinstance(nested, dict) else {})}
        return values

    def __post_init__(self) -> None:
        if not isinstance(self.reader, ReaderConfig):  # a dict: settings on top of the trainer's reader defaults
            values = deep_merge(as_dict(_training_reader()), self.reader) if isinstance(self.reader, dict) else self.reader
            self.reader = from_dict(ReaderConfig, values, "reader")
        if not isinstance(self.sae, SAEConfig):
            self.sae = from_dict(SAEConfig, self.sae, "sae")
        plain = ReaderConfig()
        refused = sorted(k for k, v in _TRAINING_READS.items() if getattr(self.reader, k) not in (v, getattr(plain, k)))
        if refused:
            raise ConfigError(f"the trainer reads with {_TRAINING_READS}; leave reader {refused} unset")
        self.reader = dataclasses.replace(self.reader, **_TRAINING_READS)
        for name, value in RECIPES[self.sae.arch].items():  # the arch's recipe where nothing was given
            if getattr(self, name) is None:
                setattr(self, name, value)
        check_choice("autocast", self.autocast, AUTOCAST_MODES)
        for name in ("total_tokens", "checkpoint_every_tokens", "log_every_steps", "dead_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and not _is_positive(self.lr):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if self.warmup_tokens < 0 or not 0 <= self.decay_start <= 1:
            raise ConfigError(f"warmup_tokens must be >= 0 and decay_start in [0, 1], got {self.warmup_tokens}, "
                              f"{self.decay_start}")
        if not (math.isfinite(self.auxk_coef) and self.auxk_coef >= 0) or (self.k_aux is not None and self.k_aux < 1):
            raise ConfigError(f"auxk_coef must be >= 0 and k_aux >= 1, got {self.auxk_coef}, {self.k_aux}")

    def check_complete(self) -> None:
        """What a run cannot start without (a config file may supply it, so it is not checked earlier)."""
        missing = [name for name, v in (("store", self.store), ("location", self.reader.location), ("out", self.out))
                   if v is None]
        if missing:
            raise ConfigError(f"training needs {', '.join(missing)} (as arguments or in --config)")

    @property
    def device(self) -> str:
        return self.reader.device

    def autocast_context(self):
        """The encoder and losses run under bf16 autocast; weights, Adam and the decoder's
        embedding_bag stay float32."""
        device_type = torch.device(self.device).type
        on = self.autocast == "bf16" or (self.autocast == "auto" and device_type == "cuda")
        return torch.autocast(device_type, dtype=torch.bfloat16) if on else contextlib.nullcontext()

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return CLIPSCOPE_LR if self.sae.arch == "clipscope" else 2e-4 / math.sqrt(self.sae.n_latents / 2**14)


def lr_at(cfg: TrainerConfig, tokens: int) -> float:
    base = cfg.learning_rate()
    if cfg.warmup_tokens and tokens < cfg.warmup_tokens:
        return base * (tokens + cfg.reader.batch_size) / cfg.warmup_tokens
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
    return scale * metrics.nmse_loss(residual, recon)


class TrainingStep(nn.Module):
    """The forward of one training step (encode, sparse decode, MSE and AuxK losses) as a module, so
    that DistributedDataParallel can wrap it and average the gradients of its backward."""

    def __init__(self, sae: TopKSAE, k_aux: int, auxk_coef: float) -> None:
        super().__init__()
        self.sae, self.k_aux, self.auxk_coef = sae, k_aux, auxk_coef

    def forward(self, x: torch.Tensor, dead: torch.Tensor) -> dict:
        values, indices, pre = self.sae.encode_topk(x)
        x_hat = self.sae.decode_sparse(values, indices)
        loss_main = metrics.mse_loss(x, x_hat)
        aux = auxk_loss(self.sae, x, x_hat, pre, dead, self.k_aux) if self.auxk_coef else x.new_zeros(())
        return {"values": values, "indices": indices, "x_hat": x_hat, "mse": loss_main, "auxk": aux,
                "loss": loss_main + self.auxk_coef * aux}


def distributed(step: TrainingStep, world: int) -> nn.Module:
    """The step as every rank runs it: wrapped in DistributedDataParallel when there are several."""
    if world == 1:
        return step
    device = next(step.parameters()).device
    return nn.parallel.DistributedDataParallel(step, device_ids=[device] if device.type == "cuda" else None)


def sae_step(step: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, dead: metrics.DeadLatents,
             autocast=contextlib.nullcontext(), world: int = 1, aux_dead: torch.Tensor | None = None) -> dict:
    """One training step of a `TrainingStep` (or its DDP wrapper): forward, backward (gradients
    averaged over ranks by DDP), parallel-gradient removal, Adam, decoder renormalisation, dead
    counters. `aux_dead` replaces the counters' dead mask for AuxK (benchmarks fix it to time AuxK
    at a chosen dead fraction)."""
    sae = getattr(step, "module", step).sae
    with autocast:
        out = step(x, dead.dead if aux_dead is None else aux_dead)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    sae.remove_parallel_gradient_()
    opt.step()
    sae.normalize_decoder_()
    dead.update(out["indices"], out["values"].detach(), x.shape[0], world)
    return out


class Trainer:
    def __init__(self, cfg: TrainerConfig) -> None:
        cfg.check_complete()
        self.rank, self.world = _init_distributed(cfg)
        self.cfg = cfg
        torch.manual_seed(cfg.reader.seed)
        self.store = open_store(cfg.store, cfg.storage_options or None)
        self.reader = ShuffledReader(self.store, cfg.reader, rank=self.rank, world_size=self.world)
        self.reader.require_batches()  # a run that yields no batch would wait forever for one
        sae_cfg = dataclasses.replace(cfg.sae, d_in=cfg.sae.d_in or self.store.d_model)
        if sae_cfg.d_in != self.store.d_model:
            raise ConfigError(f"sae.d_in is {sae_cfg.d_in} but {self.store.url} stores d_model {self.store.d_model}")
        self.sae = TopKSAE.from_config(sae_cfg, seed=cfg.reader.seed).to(cfg.device)
        self.k_aux = cfg.k_aux or sae_cfg.d_in // 2
        self.step_module = distributed(TrainingStep(self.sae, self.k_aux, cfg.auxk_coef), self.world)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=cfg.learning_rate())
        self.dead = metrics.DeadLatents(sae_cfg.n_latents, cfg.dead_tokens, device=cfg.device)
        self.step, self.tokens = 0, 0
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.resumed_from = self._resume()

    # ------------------------------------------------------------------ checkpoints
    def checkpoints(self) -> list[Path]:
        return checkpoint.list_checkpoints(self.out)

    def _run_description(self) -> dict:
        cfg = self.cfg
        return {"sae": self.sae.config_dict(), "world_size": self.world,
                "trainer": redacted(cfg),
                "store": self.store.url, "location": cfg.reader.location, "tokens": self.reader.cfg.tokens,
                "holdout": cfg.reader.holdout if cfg.reader.split == "train" else 0.0,
                "normalizer": {k: v for k, v in self.reader.normalizer.state_dict().items() if k in ("mode", "source")}}

    def save_checkpoint(self) -> Path:
        """Rank 0 writes weights, optimiser and counters (identical on every rank); each rank writes
        its own reader state; rank 0 renames the folder once all are written."""
        tmp = checkpoint.start(self.out, self.tokens) if self.rank == 0 else checkpoint.staging_dir(self.out, self.tokens)
        _barrier(self.world)
        checkpoint.write_reader_state(tmp, self.rank, self.reader.state_dict())
        if self.rank == 0:
            checkpoint.write_training_state(tmp, sae=self.sae, optimizer=self.opt, dead=self.dead, step=self.step,
                                            tokens=self.tokens, world_size=self.world,
                                            normalizer=self.reader.normalizer, config=self._run_description())
        _barrier(self.world)
        final = checkpoint.publish(tmp, self.tokens) if self.rank == 0 else tmp.parent / f"{self.tokens:013d}"
        _barrier(self.world)
        return final

    def _resume(self) -> Path | None:
        path = checkpoint.newest(self.out)
        if path is None:
            return None
        saved = _saved_sae(path)
        if saved != self.sae.config_dict():
            differ = ", ".join(f"{k} {saved.get(k)} there, {v} here" for k, v in self.sae.config_dict().items()
                               if saved.get(k) != v)
            raise CheckpointError(f"{path} holds an SAE of {saved}; this run asks for {self.sae.config_dict()} "
                                  f"({differ}). Resume with the same SAE settings (e.g. the same --arch), or train "
                                  f"into a new --out")
        state = checkpoint.read_training_state(path, self.cfg.device)
        if state.get("world_size", 1) != self.world:
            raise DistributedError(f"{path} was written by {state.get('world_size', 1)} processes; resume it with "
                                   f"as many (this run has {self.world})")
        self.sae.load_state_dict(checkpoint.read_weights(path, self.cfg.device))
        self.opt.load_state_dict(state["optimizer"])
        self.dead.load_state_dict(state["dead"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.reader.load_state_dict(checkpoint.read_reader_state(path, self.rank))
        if self.rank == 0:
            _truncate_log(self.out / checkpoint.LOG, self.step)
        return path

    # ------------------------------------------------------------------ training
    def _log_line(self, x: torch.Tensor, out: dict, t0: float, initial: int) -> dict:
        recon = metrics.Reconstruction()
        recon.add(x, out["x_hat"])
        l0 = metrics.L0()
        l0.add(out["values"])
        return {"step": self.step, "tokens": self.tokens, "loss": float(out["loss"].detach()),
                "mse": recon.mse, "auxk": float(out["auxk"].detach()), "explained_variance": recon.explained_variance, "nmse": recon.nmse,
                "l0": l0.value, "dead_proportion": self.dead.proportion(), "lr": self.opt.param_groups[0]["lr"],
                "tokens_per_s": (self.tokens - initial) / (time.perf_counter() - t0)}

    def train(self) -> dict:
        cfg = self.cfg
        it = iter(self.reader)
        log = open(self.out / checkpoint.LOG, "a")
        progress = tqdm(total=cfg.total_tokens, initial=self.tokens, unit="tok", unit_scale=True, desc="train")
        next_ckpt = (self.tokens // cfg.checkpoint_every_tokens + 1) * cfg.checkpoint_every_tokens
        wandb = _wandb(cfg) if cfg.wandb else None
        t0, initial = time.perf_counter(), self.tokens
        last = {}
        autocast = cfg.autocast_context()
        while self.tokens < cfg.total_tokens:
            x = next(it)
            if self.step == 0 and self.resumed_from is None and cfg.init_b_dec:
                self.sae.init_b_dec_(x)
                if self.world > 1:  # every rank starts from rank 0's b_dec
                    torch.distributed.broadcast(self.sae.b_dec.data, 0)
            for group in self.opt.param_groups:
                group["lr"] = lr_at(cfg, self.tokens)
            out = sae_step(self.step_module, self.opt, x, self.dead, autocast, self.world)
            self.step += 1
            self.tokens += x.shape[0] * self.world
            progress.update(x.shape[0] * self.world)
            if self.step % cfg.log_every_steps == 0 or self.tokens >= cfg.total_tokens:
                last = self._log_line(x, out, t0, initial)
                if self.rank == 0:
                    log.write(json.dumps(last) + "\n")
                    log.flush()
                if wandb is not None and self.rank == 0:
                    wandb.log(last, step=self.step)
            if self.tokens >= next_ckpt:
                self.save_checkpoint()
                next_ckpt += cfg.checkpoint_every_tokens
            faults.kill_point("train_step")
        final = self.save_checkpoint()
        progress.close()
        log.close()
        self.reader.close()
        if not _ranks_in_sync(self.sae, self.world):
            raise DistributedError("SAE weights differ between ranks after training; report this as a bug")
        return {"checkpoint": str(final), "steps": self.step, "tokens": self.tokens, "last": last,
                "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                "rank": self.rank, "world_size": self.world, "ranks_in_sync": True}


def _saved_sae(path: Path) -> dict | None:
    """A checkpoint's SAE settings as this version writes them (a 0.1 checkpoint has no arch: openai)."""
    saved = checkpoint.read_config(path).get("sae")
    try:
        return dataclasses.asdict(SAEConfig(**saved))
    except (TypeError, ConfigError):
        return saved


def _truncate_log(path: Path, step: int) -> None:
    """The training log as of a checkpoint: lines of later steps (written before a kill, and about to
    be written again by the resumed run) and a line cut by the kill are dropped."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _init_distributed(cfg: TrainerConfig) -> tuple[int, int]:
    """torchrun sets WORLD_SIZE/RANK: join the process group (gloo on CPU, nccl on CUDA)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) and launched_by_torchrun():
        backend = "nccl" if str(cfg.device).startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            cfg.reader = dataclasses.replace(cfg.reader, device=f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return resolve_rank()


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
    wandb.init(project="activation-store", config=redacted(cfg))
    return wandb


def train(cfg: TrainerConfig) -> dict:
    return Trainer(cfg).train()
