"""The SAE checkpoint of a training run, and only here: where checkpoints live, how one is written
(atomically), listed, found and read back; where the run's log lives.

    RUN/checkpoints/<tokens, 13 digits>/
        sae.safetensors        W_enc, W_dec, b_enc, b_dec, in the normalised space the SAE trained in
        config.json            {"sae": SAEConfig, "trainer": TrainerConfig, "store", "location",
                                "tokens", "holdout", "world_size", "normalizer": {mode, source}}
        trainer.pt             optimiser, dead-latent counters, step, tokens, world size, normaliser
        reader_rank<r>.pt      each rank's reader state

A checkpoint is written into `.tmp-<tokens>` and renamed, so a killed run never leaves a half one:
a folder with a trainer.pt under its final name is complete."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from activation_store.errors import CheckpointError
from activation_store.readers.normalize import Normalizer
from activation_store.sae.config import SAEConfig, SAEState
from activation_store.sae.metrics import DeadLatents

CHECKPOINTS = "checkpoints"
WEIGHTS, CONFIG, TRAINER = "sae.safetensors", "config.json", "trainer.pt"
LOG = "metrics.jsonl"  # RUN/metrics.jsonl: the trainer's metrics, one JSON line every log_every_steps


def log_of(ckpt: str | Path) -> Path:
    """The training log of the run a checkpoint belongs to."""
    return Path(ckpt).parent.parent / LOG


# ---------------------------------------------------------------------------- finding
def list_checkpoints(run: str | Path) -> list[Path]:
    """The complete checkpoints of a run folder, oldest first."""
    root = Path(run) / CHECKPOINTS
    return sorted(p for p in root.glob("[0-9]*") if (p / TRAINER).exists()) if root.is_dir() else []


def newest(run: str | Path) -> Path | None:
    found = list_checkpoints(run)
    return found[-1] if found else None


def is_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return (p / CONFIG).is_file() and (p / TRAINER).is_file() and (p / WEIGHTS).is_file()


def resolve(path: str | Path) -> Path | None:
    """A checkpoint folder as it is, or a run folder's newest checkpoint; None for anything else."""
    return Path(path) if is_checkpoint(path) else newest(path)


# ---------------------------------------------------------------------------- writing
def staging_dir(run: str | Path, tokens: int) -> Path:
    return Path(run) / CHECKPOINTS / f".tmp-{tokens:013d}"


def start(run: str | Path, tokens: int) -> Path:
    """An empty staging folder for the checkpoint at `tokens` (one process calls this)."""
    tmp = staging_dir(run, tokens)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_reader_state(tmp: Path, rank: int, state: dict) -> None:
    torch.save({"reader": state}, tmp / f"reader_rank{rank}.pt")


def write_training_state(tmp: Path, *, sae, optimizer, dead, step: int, tokens: int, world_size: int,
                         normalizer: Normalizer, config: dict) -> None:
    """Everything but the readers' states. `config` holds the JSON-able run description."""
    save_file({k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}, str(tmp / WEIGHTS))
    torch.save({"optimizer": optimizer.state_dict(), "dead": dead.state_dict(), "step": step, "tokens": tokens,
                "world_size": world_size, "normalizer": normalizer.state_dict()}, tmp / TRAINER)
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, default=str))


def publish(tmp: Path, tokens: int) -> Path:
    """Rename a complete staging folder to its final name (replacing an older one of the same name)."""
    final = tmp.parent / f"{tokens:013d}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


# ---------------------------------------------------------------------------- reading
def _need(ckpt: Path, name: str) -> Path:
    p = Path(ckpt) / name
    if not p.is_file():
        raise CheckpointError(f"{ckpt} is not a complete checkpoint: {name} is missing")
    return p


def read_config(ckpt: str | Path) -> dict:
    try:
        return json.loads(_need(Path(ckpt), CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{ckpt}/{CONFIG} is not valid JSON ({exc})") from exc


def read_training_state(ckpt: str | Path, device="cpu") -> dict:
    """trainer.pt: optimiser, dead counters, step, tokens, world size, normaliser (weights only:
    no code runs from the file)."""
    try:
        return torch.load(_need(Path(ckpt), TRAINER), map_location=device, weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{ckpt}/{TRAINER} cannot be read ({exc})") from exc


def read_reader_state(ckpt: str | Path, rank: int) -> dict:
    name = f"reader_rank{rank}.pt"
    try:
        return torch.load(_need(Path(ckpt), name), map_location="cpu", weights_only=True)["reader"]
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{ckpt}/{name} cannot be read ({exc})") from exc


def read_weights(ckpt: str | Path, device="cpu") -> dict:
    try:
        return load_file(str(_need(Path(ckpt), WEIGHTS)), device=str(device))
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{ckpt}/{WEIGHTS} cannot be read ({exc})") from exc


def read_sae_state(ckpt: str | Path) -> SAEState:
    """The SAE of a checkpoint, with the normaliser it was trained behind, what it trained on
    (store, location, tokens, holdout) and CLIP-Scope's dead proportion at this checkpoint."""
    cfg = read_config(ckpt)
    try:
        sae_cfg = SAEConfig(**cfg["sae"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{ckpt}/{CONFIG} has no valid 'sae' configuration ({exc})") from exc
    state = read_training_state(ckpt)
    dead = DeadLatents(sae_cfg.n_latents)
    dead.load_state_dict(state["dead"])
    trainer = cfg.get("trainer") or {}
    meta = {"store": cfg.get("store"), "location": cfg.get("location"),
            # checkpoints of 0.1 keep tokens and holdout only in the trainer's configuration
            "tokens": cfg.get("tokens", trainer.get("tokens", "all")),
            "holdout": float(cfg.get("holdout", trainer.get("holdout") or 0.0)),
            "dead_proportion": dead.proportion(), "checkpoint": str(ckpt)}
    return SAEState(sae_cfg, read_weights(ckpt), Normalizer.from_state_dict(state["normalizer"]), meta)
