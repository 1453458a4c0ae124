"""A torch IterableDataset over a ShuffledReader: in a DataLoader with several workers each worker
reads its own disjoint share (rank * workers + worker of world * workers), so nothing is duplicated."""

from __future__ import annotations

import torch
from torch.utils.data import IterableDataset, get_worker_info

from activation_store.distributed import resolve_rank
from activation_store.readers.readers import ShuffledReader


class ActivationDataset(IterableDataset):
    """Yields whole batches: use `DataLoader(dataset, batch_size=None, num_workers=N)`. Takes the
    store's URL (each worker opens it) and ShuffledReader's keyword arguments."""

    def __init__(self, store_url: str, location: str, storage_options: dict | None = None, **reader_kwargs) -> None:
        self.store_url, self.location = str(store_url), str(location)
        self.storage_options = storage_options
        self.kwargs = reader_kwargs

    def _share(self) -> tuple[int, int]:
        rank, world = resolve_rank(self.kwargs.get("rank"), self.kwargs.get("world_size"))
        info = get_worker_info()
        if info is None:
            return rank, world
        return rank * info.num_workers + info.id, world * info.num_workers

    def __iter__(self):
        rank, world = self._share()
        kwargs = dict(self.kwargs, rank=rank, world_size=world)
        if get_worker_info() is not None:
            torch.set_num_threads(1)
            kwargs.setdefault("threads", 2)
        reader = ShuffledReader(self.store_url, self.location, storage_options=self.storage_options, **kwargs)
        try:
            yield from reader
        finally:
            reader.close()
