"""Where images come from, split into input shards: image folders, webdataset tars (local or any
fsspec URL, brace patterns), and URL lists downloaded by img2dataset (see urls.py).

An input shard has a stable name, a capacity known before it is read (so its region can be
planned), and yields its samples in a fixed order, so a rerun stores the same rows."""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import fsspec

from activation_store.errors import ConfigError
from activation_store.harvest.decode import TRUNCATED_TAR

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


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
def expand_braces(pattern: str) -> list[str]:
    """`shard-{000..003}.tar` -> 4 names (zero padding kept); `{a,b}` alternatives; nested fine."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        a, b = rng.group(1), rng.group(2)
        width = len(a) if a.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(a), int(b) + 1)]
    else:
        options = body.split(",")
    return [x for opt in options for x in expand_braces(head + opt + tail)]


def webdataset_shards(pattern: str, storage_options: dict | None = None) -> list[InputShard]:
    urls = expand_braces(pattern)
    shards = []
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        if not fs.exists(path):
            raise ConfigError(f"webdataset shard {url} does not exist")
        shards.append(InputShard(url, _tar_capacity(fs, path), _tar_reader(fs, path, url)))
    return shards


def _split_key(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the file name."""
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _tar_capacity(fs, path: str) -> int:
    """Samples with an image in the tar: from img2dataset's sidecar parquet when present, else by
    reading the tar's headers."""
    side = re.sub(r"\.tar$", ".parquet", path)
    if side != path and fs.exists(side):
        import pyarrow.parquet as pq

        with fs.open(side, "rb") as f:
            table = pq.read_table(f, columns=["status"])
        return max(1, sum(1 for s in table["status"].to_pylist() if s == "success"))
    keys = set()
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if member.isfile():
                    keys.add(_split_key(member.name)[0])
    except (tarfile.TarError, EOFError, OSError):
        pass  # a truncated tar: its readable part is counted; the reader reports the truncation
    return max(1, len(keys))


def _tar_reader(fs, path: str, url: str):
    def read() -> Iterator[Sample]:
        row = 0
        current: dict | None = None

        def emit(group: dict) -> Sample:
            nonlocal row
            meta = {}
            if "json" in group:
                try:
                    meta = json.loads(group["json"])
                except (ValueError, UnicodeDecodeError):
                    meta = {}
            image = next((group[e] for e in IMAGE_EXTENSIONS if e in group), None)
            caption = meta.get("caption")
            if caption is None and "txt" in group:
                caption = group["txt"].decode("utf-8", errors="replace")
            sample = Sample(group["__key__"], image, row, url=meta.get("url"), caption=caption)
            row += 1
            return sample

        try:
            with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _split_key(member.name)
                    if current is not None and current["__key__"] != key:
                        yield emit(current)  # complete: the next sample's first file has begun
                        current = None
                    if current is None:
                        current = {"__key__": key}
                    current[ext] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as exc:
            # the sample being read may be incomplete: it is lost with the rest of the tar
            yield Sample(f"{url}:truncated", None, row, status=TRUNCATED_TAR,
                         error=f"{type(exc).__name__}: {exc}; later samples of this tar are lost")
            return
        if current is not None:
            yield emit(current)

    return read

