"""Where images come from, split into input shards: image folders, webdataset tars (local or any
fsspec URL, brace patterns), and URL lists downloaded by img2dataset (see urls.py).

An input shard has a stable name, a capacity known before it is read (so its region can be
planned), and yields its samples in a fixed order, so a rerun stores the same rows."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import fsspec

from activation_store.errors import ConfigError
from activation_store.harvest.decode import TRUNCATED_TAR
from activation_store.tar_shards import IMAGE_EXTENSIONS, TarSamples, expand_braces, image_of


@dataclass
class Sample:
    """One image of an input shard, before decoding."""

    key: str
    data: bytes | None
    source_row: int
    url: str | None = None
    caption: str | None = None
    status: str | None = None  # set when the sample is known bad before decoding
    error: str | None = None


@dataclass
class InputShard:
    name: str  # unique and stable: the store's shard `source`
    capacity: int  # the most images it can yield
    reader: object = field(repr=False, default=None)  # a callable returning an iterator of Sample

    def samples(self) -> Iterator[Sample]:
        return self.reader()


# ---------------------------------------------------------------------------- folders
def folder_shards(root: str, shard_size: int = 1000) -> list[InputShard]:
    """Every file under `root` (sorted, hidden files skipped), in shards of `shard_size` files.
    Non-image files are samples too: they are counted as `not_an_image`, not silently skipped."""
    base = Path(root)
    if not base.is_dir():
        raise ConfigError(f"image folder {root} does not exist")
    files = sorted(
        p for p in base.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(base).parts)
    )
    image_stems = {p.with_suffix("") for p in files if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS}
    # a caption or metadata file beside an image belongs to that image; any other file is a sample
    files = [p for p in files if not (p.suffix.lower() in (".txt", ".json") and p.with_suffix("") in image_stems)]
    if not files:
        raise ConfigError(f"image folder {root} holds no files")
    shards = []
    for i in range(0, len(files), shard_size):
        group = files[i:i + shard_size]
        shards.append(InputShard(f"{base.resolve()}#{i // shard_size:05d}", len(group), _folder_reader(base, group, i)))
    return shards


def _folder_reader(base: Path, files: list[Path], offset: int):
    def read() -> Iterator[Sample]:
        for j, path in enumerate(files):
            rel = str(path.relative_to(base))
            try:
                data = path.read_bytes()
            except OSError as exc:
                yield Sample(rel, None, offset + j, status="unreadable_file", error=str(exc))
                continue
            caption = None
            side = path.with_suffix(".txt")
            if side != path and side.exists():
                caption = side.read_text(errors="replace").strip()
            yield Sample(rel, data, offset + j, url=str(path), caption=caption)

    return read


# ---------------------------------------------------------------------------- webdataset
def webdataset_shards(pattern: str, storage_options: dict | None = None) -> list[InputShard]:
    """One input shard per tar of a brace pattern (`data-{000..099}.tar`, local or any fsspec URL)."""
    urls = expand_braces(pattern)
    repeated = sorted(u for u, n in Counter(urls).items() if n > 1)
    if repeated:
        raise ConfigError(f"shard pattern {pattern} names {repeated} more than once")
    shards = []
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        if not fs.exists(path):
            raise ConfigError(f"webdataset shard {url} does not exist")
        shards.append(InputShard(url, _tar_capacity(fs, path, url, storage_options),
                                 _tar_reader(url, storage_options)))
    return shards


def _tar_capacity(fs, path: str, url: str, storage_options: dict | None) -> int:
    """Samples in the tar: from img2dataset's sidecar parquet when present, else by reading the
    tar's headers (a truncated tar: its readable samples and the truncation, as the reader yields)."""
    side = re.sub(r"\.tar$", ".parquet", path)
    if side != path and fs.exists(side):
        import pyarrow.parquet as pq

        with fs.open(side, "rb") as f:
            table = pq.read_table(f, columns=["status"])
        return max(1, sum(1 for s in table["status"].to_pylist() if s == "success"))
    tar = TarSamples(url, storage_options, keys_only=True)
    n = sum(1 for _ in tar)
    return max(1, n + (1 if tar.truncated is not None else 0))


def _tar_reader(url: str, storage_options: dict | None):
    def read() -> Iterator[Sample]:
        tar = TarSamples(url, storage_options)
        row = -1
        for row, sample in enumerate(tar):
            meta = {}
            if "json" in sample.files:
                try:
                    meta = json.loads(sample.files["json"])
                except (ValueError, UnicodeDecodeError):
                    meta = {}
            caption = meta.get("caption")
            if caption is None and "txt" in sample.files:
                caption = sample.files["txt"].decode("utf-8", errors="replace")
            yield Sample(sample.key, image_of(sample.files), row, url=meta.get("url"), caption=caption)
        if tar.truncated is not None:
            # the sample being read may be incomplete: it is lost with the rest of the tar
            yield Sample(f"{url}:truncated", None, row + 1, status=TRUNCATED_TAR,
                         error=f"{tar.truncated}; later samples of this tar are lost")

    return read
