"""Decode workers hand pixels back through shared memory (a ring of image slots), not pickled arrays:
the harvest sees exactly the pixels a decode in its own process gives, in order, dropped images
included, with slots reused many times over, and leaves no shared memory behind."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from harvest_helpers import TINY, bad_corpus, jpeg_bytes

from activation_store.harvest import pipeline
from activation_store.harvest.model import LoadedViT, ModelConfig
from activation_store.harvest.pipeline import DecodePool, PixelRing
from activation_store.harvest.sources import Sample


@pytest.fixture(scope="module")
def vit():
    return LoadedViT(ModelConfig(model=TINY, pretrained="none"), [1])


def _samples(folder) -> list[Sample]:
    """Good JPEGs with the bad corpus interleaved, and one sample known bad before decoding."""
    bad = sorted(p for p in os.listdir(folder))
    samples = []
    for i in range(150):
        if i % 10 == 3:
            name = bad[(i // 10) % len(bad)]
            samples.append(Sample(key=f"bad{i}", data=open(os.path.join(folder, name), "rb").read(), source_row=i))
        elif i == 77:
            samples.append(Sample(key="gone", data=None, source_row=i, status="missing_image", error="gone"))
        else:
            samples.append(Sample(key=f"good{i}", data=jpeg_bytes(i, (100 + i % 9, 140)), source_row=i))
    return samples


def _shm_names() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def _copy_out(decoded):
    """What the harvest does with each item: copy its pixels before asking for the next."""
    return [(s.key, d.status, None if d.pixels is None else np.array(d.pixels)) for s, d in decoded]


def test_ring_gives_the_same_pixels_in_order_with_slots_reused(tmp_path, vit, monkeypatch):
    bad_corpus(tmp_path / "bad")
    monkeypatch.setattr(pipeline, "_CHUNKS_IN_FLIGHT_PER_WORKER", 2)  # 24 slots for 150 images: each reused
    h, w = vit.preprocess["image_size"]
    before = _shm_names()
    local = DecodePool(vit.transform, 0, 2, use_fork=True)
    expected = _copy_out(local.imap(_samples(tmp_path / "bad")))
    pool = DecodePool(vit.transform, 2, 2, use_fork=True, pixel_shape=(h, w, 3))
    try:
        assert pool.ring is not None and pool.ring.slots < len(expected) / 4
        got = _copy_out(pool.imap(_samples(tmp_path / "bad")))
    finally:
        pool.close()
    assert [(k, s) for k, s, _ in got] == [(k, s) for k, s, _ in expected]
    assert sum(p is None for _, _, p in got) >= 8  # the dropped images came through as dropped
    assert ("gone", "missing_image", None) in [(k, s, p) for k, s, p in got]
    for (_, _, a), (_, _, b) in zip(got, expected):
        assert (a is None and b is None) or np.array_equal(a, b)
    assert _shm_names() == before  # the ring is gone with the pool


def test_workers_send_back_an_index_not_the_pixels(vit):
    """What crosses the process boundary for a decoded image is a few hundred bytes, not 150 KB."""
    h, w = vit.preprocess["image_size"]
    ring = PixelRing((h, w, 3), 4)
    try:
        pipeline._init_worker(vit.transform, 2, in_child=False, ring_args=ring.attach_args())
        sample = Sample(key="a", data=jpeg_bytes(1, (120, 160)), source_row=0)
        [(s, dec)] = pipeline._decode_chunk([sample], [2])
        assert dec.pixels == 2
        assert len(pickle.dumps((s, dec))) < 2000
        direct = pipeline.decode_image(jpeg_bytes(1, (120, 160)), vit.transform)
        assert np.array_equal(ring.array[2], direct.pixels)
    finally:
        pipeline._worker_ring.close()
        pipeline._worker_ring = None
        ring.close()
