"""ShuffledReader and OrderedReader: batches of activation vectors from a store."""

from __future__ import annotations

import dataclasses

from activation_store.configs import as_dict
from activation_store.distributed import resolve_rank
from activation_store.errors import ConfigError, NoDataError
from activation_store.readers.config import ReaderConfig
from activation_store.readers.engine import Engine
from activation_store.readers.normalize import Normalizer
from activation_store.readers.selection import TokenSelection
from activation_store.store import ActivationStore, open_store

STATE_VERSION = 1
# what a saved state must agree on with the reader that loads it
_RESUME_KEYS = ("location", "tokens", "batch_size", "buffer_tokens", "seed", "shuffle", "drop_last", "split", "holdout")


def _images_read(config: dict) -> dict:
    """The resume keys of a config, with equal image selections written alike: 'train' with no
    holdout is every image ('all'), and an 'all' reader's holdout plays no part."""
    c = {k: config[k] for k in _RESUME_KEYS}
    if c["split"] == "train" and not c["holdout"]:
        c["split"] = "all"
    if c["split"] == "all":
        c["holdout"] = None
    return c


def reader_config(config: ReaderConfig | str | None, overrides: dict, fixed: dict | None = None) -> ReaderConfig:
    """A ReaderConfig from a config (or a location string) with keyword overrides on top; `fixed`
    holds what the reader class itself decides (an OrderedReader never shuffles)."""
    if isinstance(config, ReaderConfig):
        base = config
    else:
        base = ReaderConfig(location=config)
    clash = sorted(set(overrides) & set(fixed or {}))
    if clash:
        raise ConfigError(f"{', '.join(clash)} cannot be set for this reader")
    names = {f.name for f in dataclasses.fields(ReaderConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown reader settings {unknown}; ReaderConfig has {sorted(names)}")
    cfg = dataclasses.replace(base, **overrides, **(fixed or {}))
    if cfg.location is None:
        raise ConfigError("a reader needs a location, e.g. ShuffledReader(store, 'resid_22')")
    return cfg


class _Reader:
    _fixed: dict = {}

    def __init__(self, store, config: ReaderConfig | str | None = None, *, storage_options: dict | None = None,
                 **overrides) -> None:
        self.store: ActivationStore = store if isinstance(store, ActivationStore) else open_store(store, storage_options)
        self.cfg = cfg = reader_config(config, overrides, self._fixed)
        self.location = self.store.check_location(cfg.location)
        self.selection = TokenSelection.resolve(cfg.tokens, self.store.n_tokens)
        self.rank, self.world = resolve_rank(cfg.rank, cfg.world_size)
        self.normalizer = Normalizer.from_store(cfg.normalize, self.store, self.location, self.selection.stats_group)
        self.engine = Engine(self.store, cfg, self.selection, self.normalizer, self.rank, self.world)
        # position: the next batch to yield
        self._epoch, self._window, self._pos, self._batch = 0, 0, 0, 0
        self._shards: list[int] | None = None  # committed shards this epoch reads (fixed per epoch)

    # ------------------------------------------------------------------ iteration
    def _epoch_chunks(self):
        if self._shards is None:
            self.store.refresh()  # shards committed since the last epoch join from this epoch on
            self._shards = [s.index for s in self.store.committed_shards()]
        return self.store.chunk_refs(self.location, cls=self.selection.cls_only, shards=self._shards)

    def __iter__(self):
        while self.cfg.epochs is None or self._epoch < self.cfg.epochs:
            plan = self.engine.plan(self._epoch, self._epoch_chunks())
            if self.cfg.epochs is None:  # reading forever would never yield
                self._require_batches(plan)
            for w, pos, batch, ids in self.engine.iterate(self._epoch, plan, self._window, self._pos, self._batch):
                self._window, self._pos, self._batch = w, pos, self._batch + 1
                yield (batch, ids) if self.cfg.return_ids else batch
            self._epoch, self._window, self._pos, self._batch = self._epoch + 1, 0, 0, 0
            self._shards = None
            if not plan["windows"]:
                return

    def _require_batches(self, plan: dict | None = None) -> None:
        """NoDataError, saying why, when this rank's epoch yields no batch."""
        plan = plan or self.engine.plan(self._epoch, self._epoch_chunks())
        if plan["n_batches"]:
            return
        what = f"{self.location} tokens ({self.selection.name}, split {self.cfg.split})"
        if not plan["tokens"]:
            raise NoDataError(f"{self.store.url} has no committed {what} for rank {self.rank} of {self.world}")
        raise NoDataError(f"{self.store.url}: rank {self.rank} of {self.world} has {plan['tokens']:,} {what}, fewer "
                          f"than one batch of {self.cfg.batch_size:,} with drop_last; lower the batch size or add data")

    def require_batches(self) -> None:
        """Fail now, with the reason, if the current epoch would yield no batch on this rank."""
        self._require_batches()

    @property
    def window_tokens(self) -> int:
        """Tokens per window (from `buffer_tokens`, or from the `memory` budget when set)."""
        return self.engine.buffer_tokens

    def memory_plan(self) -> dict:
        """Bytes the reader holds: its two windows and its fixed buffers (what `memory` budgets)."""
        return dict(self.engine.sizes)

    def epoch_size(self) -> dict:
        """Tokens and batches this rank yields in the current epoch."""
        plan = self.engine.plan(self._epoch, self._epoch_chunks())
        return {"tokens": plan["yield_tokens"], "batches": plan["n_batches"]}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Where the reader is: load it into a reader of the same configuration to continue exactly."""
        return {"version": STATE_VERSION, "config": as_dict(self.cfg), "rank": self.rank, "world_size": self.world,
                "window_tokens": self.window_tokens, "epoch": self._epoch, "window": self._window, "position": self._pos, "batch": self._batch,
                "shards": self._shards, "normalizer": self.normalizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"reader state version {state.get('version')} is not {STATE_VERSION}")
        mine, saved = _images_read(as_dict(self.cfg)), _images_read(state["config"])
        if "window_tokens" in state:  # the windows decide the order: compare them, however they were sized
            mine["buffer_tokens"], saved["buffer_tokens"] = self.window_tokens, state["window_tokens"]
        for key in _RESUME_KEYS:
            if saved[key] != mine[key]:
                raise ConfigError(
                    f"reader state was saved with {key}={saved[key]!r}, this reader has {mine[key]!r}; "
                    f"resume with the same configuration"
                )
        if (state["rank"], state["world_size"]) != (self.rank, self.world):
            raise ConfigError(f"reader state is of rank {state['rank']}/{state['world_size']}, "
                              f"this reader is {self.rank}/{self.world}")
        self._epoch, self._window, self._pos, self._batch = state["epoch"], state["window"], state["position"], state["batch"]
        self._shards = state["shards"]

    def close(self) -> None:
        self.engine.close()


class ShuffledReader(_Reader):
    """Shuffled batches `(batch_size, d_model)` of one location's tokens; each epoch yields every
    selected committed token exactly once (the last batch smaller, unless drop_last), split
    disjointly across ranks.

    `ShuffledReader(store, "resid_22", batch_size=4096, ...)` or `ShuffledReader(store, ReaderConfig(...),
    **overrides)`: the settings are ReaderConfig's fields."""

    _fixed = {"shuffle": True}


class OrderedReader(_Reader):
    """Batches in store order, with `(image_row, token_index)` ids: for evaluation and mining
    top-activating images. `tokens='cls'` reads only the small CLS array."""

    _fixed = {"shuffle": False, "return_ids": True, "epochs": 1, "drop_last": False}
