"""Shared by the harvest tests: a tiny patch-14 ViT config, a small harvest config, images,
bad-input corpora, and a store's data objects (to compare two stores)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

TINY = str(Path(__file__).parent / "data" / "tiny-vit-14.json")  # 257 tokens, width 64, 4 blocks
TINY_NAME = "tiny-vit-14"


def make_images(folder, n: int, seed: int = 0) -> list[str]:
    """n RGB JPEGs of varied sizes (so resize and crop are exercised)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        h, w = 150 + 13 * (i % 7), 180 + 29 * (i % 5)
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        name = f"img{i:03d}.jpg"
        Image.fromarray(arr).save(os.path.join(folder, name), quality=90)
        names.append(name)
    return names


def jpeg_bytes(seed: int, size=(96, 128)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def bad_corpus(folder) -> dict[str, str | None]:
    """Files that must all be counted and none crash the harvest: {file: expected status, or None
    for images that are converted to RGB and stored}."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    f = Path(folder)
    good = jpeg_bytes(0, (120, 160))
    (f / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (f / "corrupt.jpg").write_bytes(good[:20] + bytes(rng.integers(0, 255, 3000, dtype=np.uint8)))
    (f / "noise.bin").write_bytes(bytes(rng.integers(0, 255, 5000, dtype=np.uint8)))
    (f / "text.jpg").write_bytes(b"<html>404 not found</html>")
    (f / "empty.png").write_bytes(b"")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(f / "one_pixel.png")
    Image.new("1", (10_000, 10_000)).save(f / "bomb.png")  # 100 M pixels, a few KB: over Pillow's limit
    arr = rng.integers(0, 255, (90, 110, 4), dtype=np.uint8)
    Image.fromarray(arr, "RGBA").save(f / "rgba.png")
    Image.fromarray(arr[..., :3]).convert("CMYK").save(f / "cmyk.jpg")
    Image.fromarray(arr[..., :3]).convert("P").save(f / "palette.png")
    Image.fromarray(arr[..., 0]).save(f / "grey.png")
    Image.fromarray((rng.integers(0, 65535, (90, 110))).astype(np.uint16)).save(f / "sixteen.png")
    return {
        "truncated.jpg": "truncated_image", "corrupt.jpg": "not_an_image", "noise.bin": "not_an_image",
        "text.jpg": "not_an_image", "empty.png": "not_an_image", "one_pixel.png": "too_small",
        "bomb.png": "decompression_bomb", "rgba.png": None, "cmyk.jpg": None, "palette.png": None, "grey.png": None,
        "sixteen.png": None,
    }


def write_tar(path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A webdataset tar at a path or into an open binary file: `{key}.{ext}` members in order."""
    with (tarfile.open(fileobj=path, mode="w") if hasattr(path, "write") else tarfile.open(path, "w")) as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def cfg_for(out, **kw):
    """A harvest of the tiny ViT into `out`: layers 1 and 3, batches of 3, no decode workers, 4-image
    chunks, 8-image regions (keywords override them)."""
    from activation_store.harvest.config import HarvestConfig
    from activation_store.harvest.model import ModelConfig

    kw = {"layers": [1, 3], "batch_size": 3, "workers": 0, **kw}
    cfg = HarvestConfig(out=str(out), model=ModelConfig(model=TINY, pretrained="none"), progress=False,
                        report=str(out) + ".report.json", **kw)
    cfg.store.chunk_images, cfg.store.region_images = 4, 8
    return cfg


def data_objects(url):
    """Every object holding data (chunks, statistics) by key, and the image tables."""
    from activation_store.store import open_store

    s = open_store(url)
    files = s.storage.list_files("")
    objects = {k: s.storage.read_bytes(k) for k in files if "/c/" in k}
    return objects, s.images(include_dropped=True).sort_by("key")
