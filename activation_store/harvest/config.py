"""The harvest's typed configuration, loadable from TOML or YAML and overridden by CLI flags."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from activation_store.config_file import read_config_file
from activation_store.errors import ConfigError
from activation_store.harvest.model import ModelConfig
from activation_store.store.config import StoreConfig
from activation_store.store.locations import parse_locations

DEFAULT_LAYERS = "2,5,8,11,14,17,20,22"


@dataclass
class DownloadConfig:
    """img2dataset settings for `--urls` sources."""

    work_dir: str | None = None  # where the webdataset shards go (default: beside the store)
    url_col: str = "url"
    caption_col: str | None = "caption"
    number_sample_per_shard: int = 1000
    processes_count: int = 2
    thread_count: int = 16
    timeout: int = 10
    retries: int = 0
    resize_mode: str = "no"  # keep originals: open_clip's own preprocessing runs in the harvest


@dataclass
class HarvestConfig:
    out: str = ""
    urls: str | None = None
    shards: str | None = None
    images: str | None = None
    layers: list[int] = field(default_factory=lambda: [loc.layer for loc in parse_locations(DEFAULT_LAYERS)])
    model: ModelConfig = field(default_factory=ModelConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    batch_size: int = 64
    workers: int = 4  # decode processes; 0 decodes in the main process
    shard_size: int = 1000  # images per input shard for image folders
    min_image_size: int = 2  # images smaller than this (either side) are dropped as too_small
    rank: int | None = None
    world_size: int | None = None
    storage_options: dict = field(default_factory=dict)
    report: str | None = None  # JSON report path (default: beside a local store, else the cwd)
    progress: bool = True
    wait_for_plan_s: float = 600.0  # ranks > 0 wait this long for rank 0 to plan the store

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            self.layers = [loc.layer for loc in parse_locations(self.layers)]
        if isinstance(self.model, dict):
            self.model = ModelConfig(**self.model)
        if isinstance(self.store, dict):
            self.store = StoreConfig(**self.store)
        if isinstance(self.download, dict):
            self.download = DownloadConfig(**self.download)

    def validate(self) -> None:
        given = [k for k in ("urls", "shards", "images") if getattr(self, k)]
        if len(given) != 1:
            raise ConfigError("give exactly one source: --urls FILE, --shards PATTERN or --images DIR")
        if not self.out:
            raise ConfigError("--out STORE is required")
        if self.batch_size < 1 or self.workers < 0 or self.shard_size < 1:
            raise ConfigError("batch size and shard size must be >= 1, workers >= 0")

    @property
    def locations(self) -> list[str]:
        return [f"resid_{layer}" for layer in sorted(set(self.layers))]

    def to_dict(self) -> dict:
        """For the store's `harvest_config` attribute: storage options may hold credentials, so only
        their names are kept."""
        d = asdict(self)
        d["storage_options"] = sorted(self.storage_options)
        return d


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values win; else torchrun's RANK/WORLD_SIZE; else SLURM's; else a single process."""
    env = os.environ
    if rank is None:
        rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    if world_size is None:
        world_size = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, world size {world_size})")
    return rank, world_size


def load_config_file(path: str) -> dict:
    """A TOML or YAML file with the HarvestConfig's fields (nested tables for model/store/download)."""
    return read_config_file(path, "harvest", HarvestConfig)


def build_config(file_values: dict, overrides: dict) -> HarvestConfig:
    """Merge a config file's values with CLI overrides (flags win; nested keys as 'model.seed')."""
    merged: dict = {k: (dict(v) if isinstance(v, dict) else v) for k, v in file_values.items()}
    for key, value in overrides.items():
        if value is None:
            continue
        if "." in key:
            section, name = key.split(".", 1)
            merged.setdefault(section, {})
            if not isinstance(merged[section], dict):
                merged[section] = asdict(merged[section])
            merged[section][name] = value
        else:
            merged[key] = value
    try:
        cfg = HarvestConfig(**merged)
    except TypeError as exc:
        raise ConfigError(f"bad harvest configuration: {exc}") from exc
    cfg.validate()
    return cfg
