"""ShuffledReader and OrderedReader: batches of activation vectors from a store."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from activation_store.errors import ConfigError
from activation_store.readers.engine import Engine, list_units
from activation_store.readers.normalize import Normalizer
from activation_store.readers.selection import TokenSelection
from activation_store.store import ActivationStore, open_store

STATE_VERSION = 1


@dataclass
class ReaderConfig:
    """What to read and how. `epochs=None` reads forever (a new permutation every epoch)."""

    location: str
    tokens: object = "all"  # 'all', 'cls', 'patches' or a list of token indices
    batch_size: int = 4096
    buffer_tokens: int = 2**19  # tokens per window; two windows are held (one served, one loading)
    seed: int = 0
    rank: int | None = None
    world_size: int | None = None
    epochs: int | None = 1
    dtype: str = "float32"  # of the yielded tensors: float32, bfloat16, float16
    device: str = "cpu"
    normalize: str = "none"  # none, standardize, unit_mean_sq_norm
    drop_last: bool = False
    return_ids: bool = False  # also yield (image_row, token_index) per vector
    threads: int = 4  # chunk fetch/decode threads
    shuffle: bool = True
    split: str = "all"  # 'all', or 'train' / 'eval': images split by a fixed hash of their row
    holdout: float = 0.05  # share of images in 'eval' when split is not 'all'


def _rank_world(rank: int | None, world: int | None) -> tuple[int, int]:
    if rank is not None and world is not None:
        return rank, world
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return (torch.distributed.get_rank() if rank is None else rank,
                torch.distributed.get_world_size() if world is None else world)
    return rank or 0, world or 1


class _Reader:
    def __init__(self, store, cfg: ReaderConfig, storage_options: dict | None = None) -> None:
        self.store: ActivationStore = store if isinstance(store, ActivationStore) else open_store(store, storage_options)
        self.cfg = cfg
        loc = str(cfg.location)
        if loc not in self.store.locations:
            raise ConfigError(f"{self.store.url} has no location {loc!r}; it has {', '.join(self.store.locations)}")
        self.location = loc
        self.selection = TokenSelection.resolve(cfg.tokens, self.store.n_tokens)
        self.rank, self.world = _rank_world(cfg.rank, cfg.world_size)
        self.normalizer = Normalizer.from_store(cfg.normalize, self.store, loc, self.selection.stats_group)
        self.engine = Engine(self.store, loc, self.selection, batch_size=cfg.batch_size,
                             buffer_tokens=cfg.buffer_tokens, seed=cfg.seed, rank=self.rank,
                             world_size=self.world, shuffle=cfg.shuffle, drop_last=cfg.drop_last, dtype=cfg.dtype,
                             device=cfg.device, normalizer=self.normalizer, return_ids=cfg.return_ids,
                             threads=cfg.threads,
                             split=None if cfg.split == "all" else (cfg.split, cfg.holdout))
        # position: the next batch to yield
        self._epoch, self._window, self._pos, self._batch = 0, 0, 0, 0
        self._shards: list[int] | None = None  # committed shards this epoch reads (fixed per epoch)

    # ------------------------------------------------------------------ iteration
    def _epoch_units(self):
        if self._shards is None:
            self.store.refresh()  # shards committed since the last epoch join from this epoch on
            self._shards = [s.index for s in self.store.committed_shards()]
        return list_units(self.store, self.location, self.selection, self._shards)

    def __iter__(self):
        while self.cfg.epochs is None or self._epoch < self.cfg.epochs:
            plan = self.engine.plan(self._epoch, self._epoch_units())
            for w, pos, batch, ids in self.engine.iterate(self._epoch, plan, self._window, self._pos, self._batch):
                self._window, self._pos, self._batch = w, pos, self._batch + 1
                yield (batch, ids) if self.cfg.return_ids else batch
            self._epoch, self._window, self._pos, self._batch = self._epoch + 1, 0, 0, 0
            self._shards = None
            if not plan["windows"]:
                if self.cfg.epochs is None:
                    raise ConfigError(f"{self.store.url} has no committed {self.location} tokens to read")
                return

    def epoch_size(self) -> dict:
        """Tokens and batches this rank yields in the current epoch."""
        plan = self.engine.plan(self._epoch, self._epoch_units())
        return {"tokens": plan["yield_tokens"], "batches": plan["n_batches"]}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Where the reader is: load it into a reader of the same configuration to continue exactly."""
        return {"version": STATE_VERSION, "config": asdict(self.cfg) | {"tokens": self._tokens_json()},
                "rank": self.rank, "world_size": self.world, "epoch": self._epoch, "window": self._window,
                "position": self._pos, "batch": self._batch, "shards": self._shards,
                "normalizer": self.normalizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"reader state version {state.get('version')} is not {STATE_VERSION}")
        mine = asdict(self.cfg) | {"tokens": self._tokens_json()}
        for key in ("location", "tokens", "batch_size", "buffer_tokens", "seed", "shuffle", "drop_last", "split",
                    "holdout"):
            if state["config"][key] != mine[key]:
                raise ConfigError(
                    f"reader state was saved with {key}={state['config'][key]!r}, this reader has {mine[key]!r}; "
                    f"resume with the same configuration"
                )
        if (state["rank"], state["world_size"]) != (self.rank, self.world):
            raise ConfigError(f"reader state is of rank {state['rank']}/{state['world_size']}, "
                              f"this reader is {self.rank}/{self.world}")
        self._epoch, self._window, self._pos, self._batch = state["epoch"], state["window"], state["position"], state["batch"]
        self._shards = state["shards"]

    def _tokens_json(self):
        t = self.cfg.tokens
        return t if isinstance(t, str) else [int(x) for x in t]

    def close(self) -> None:
        self.engine.close()


class ShuffledReader(_Reader):
    """Shuffled batches `(batch_size, d_model)` of one location's tokens; each epoch yields every
    selected committed token exactly once (the last batch smaller, unless drop_last), split
    disjointly across ranks. See ReaderConfig for the arguments."""

    def __init__(self, store, location, tokens="all", batch_size: int = 4096, buffer_tokens: int = 2**19,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None, epochs: int | None = 1,
                 dtype: str = "float32", device: str = "cpu", normalize: str = "none", drop_last: bool = False,
                 return_ids: bool = False, threads: int = 4, storage_options: dict | None = None,
                 split: str = "all", holdout: float = 0.05) -> None:
        cfg = ReaderConfig(str(location), tokens, batch_size, buffer_tokens, seed, rank, world_size, epochs, dtype,
                           device, normalize, drop_last, return_ids, threads, shuffle=True, split=split, holdout=holdout)
        super().__init__(store, cfg, storage_options)


class OrderedReader(_Reader):
    """Batches in store order, with `(image_row, token_index)` ids: for evaluation and mining
    top-activating images. `tokens='cls'` reads only the small CLS array."""

    def __init__(self, store, location, tokens="all", batch_size: int = 4096, buffer_tokens: int = 2**19,
                 rank: int | None = None, world_size: int | None = None, dtype: str = "float32",
                 device: str = "cpu", normalize: str = "none", threads: int = 4,
                 storage_options: dict | None = None, split: str = "all", holdout: float = 0.05) -> None:
        cfg = ReaderConfig(str(location), tokens, batch_size, buffer_tokens, 0, rank, world_size, 1, dtype, device,
                           normalize, False, True, threads, shuffle=False, split=split, holdout=holdout)
        super().__init__(store, cfg, storage_options)
