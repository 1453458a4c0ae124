"""Helpers shared by the store tests and the writer subprocesses they start."""

from __future__ import annotations

import numpy as np

from activation_store.store import ActivationStore, ImageRecord, StoreConfig
from activation_store.synthetic import synthetic_activations

T, D = 17, 32  # small token count and width keep tests fast; the format is size-agnostic


def make_store(url, locations="resid_2,resid_5", storage_options=None, **config) -> ActivationStore:
    config.setdefault("chunk_images", 4)
    config.setdefault("region_images", 8)
    return ActivationStore.create(
        url, locations=locations, n_tokens=T, d_model=D, config=StoreConfig(**config),
        model={"name": "test", "pretrained": "none"}, storage_options=storage_options,
    )


def shard_data(store, seed: int, n: int) -> dict[str, np.ndarray]:
    """Deterministic activations of one shard, per location (different for each location)."""
    return {loc: synthetic_activations(seed * 100 + i, n, store.n_tokens, store.d_model)
            for i, loc in enumerate(store.locations)}


def records(source: str, n: int) -> list[ImageRecord]:
    return [ImageRecord(key=f"{source}/{i:05d}", url=f"http://x/{source}/{i}.jpg", caption=f"image {i}",
                        width=64 + i, height=48, source_shard=source, source_row=i) for i in range(n)]


def write_shard(store, source: str, seed: int, n: int, batch: int = 3, dropped: int = 0, commit: bool = True,
                on_batch=None):
    data = shard_data(store, seed, n)
    recs = records(source, n)
    w = store.writer(source)
    for i in range(0, n, batch):
        w.add({k: v[i:i + batch] for k, v in data.items()}, recs[i:i + batch])
        if on_batch:
            on_batch(i)
    w.add_dropped([ImageRecord(key=f"{source}/bad{j}", source_shard=source, status="decode_error",
                               error="truncated JPEG") for j in range(dropped)])
    if commit:
        w.commit()
    return data
