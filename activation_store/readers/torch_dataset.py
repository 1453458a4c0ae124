"""A torch IterableDataset over a ShuffledReader: in a DataLoader with several workers each worker
reads its own disjoint share (rank * workers + worker of world * workers), so nothing is duplicated."""

from __future__ import annotations

import torch
from torch.utils.data import IterableDataset, get_worker_info

from activation_store.distributed import resolve_rank
from activation_store.readers.config import ReaderConfig
from activation_store.readers.readers import ShuffledReader, reader_config


class ActivationDataset(IterableDataset):
    """Yields whole batches: use `DataLoader(dataset, batch_size=None, num_workers=N)`. Takes the
    store's URL (each worker opens it) and what a ShuffledReader takes: a ReaderConfig or a
    location, plus keyword overrides."""

    def __init__(self, store_url: str, config: ReaderConfig | str, storage_options: dict | None = None,
                 **overrides) -> None:
        self.store_url = str(store_url)
        self.cfg = reader_config(config, overrides, {"shuffle": True})
        self.storage_options = storage_options

    def _share(self) -> tuple[int, int]:
        rank, world = resolve_rank(self.cfg.rank, self.cfg.world_size)
        info = get_worker_info()
        if info is None:
            return rank, world
        return rank * info.num_workers + info.id, world * info.num_workers

    def __iter__(self):
        rank, world = self._share()
        overrides = {"rank": rank, "world_size": world}
        if get_worker_info() is not None:
            torch.set_num_threads(1)
            overrides["threads"] = min(self.cfg.threads, 2)
            overrides["gather_threads"] = self.cfg.gather_threads or 1  # the workers share the cores
        reader = ShuffledReader(self.store_url, self.cfg, storage_options=self.storage_options, **overrides)
        try:
            yield from reader
        finally:
            reader.close()
