"""Where images come from, split into input shards: image folders, webdataset tars (local or any
fsspec URL, brace patterns), and URL lists downloaded by img2dataset (see urls.py).

An input shard has a stable name, a capacity known before it is read (so its region can be
planned), and yields its samples in a fixed order, so a rerun stores the same rows."""

from __future__ import annotations

import json
import os
import re
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

from activation_store.errors import ConfigError
from activation_store.harvest.decode import DUPLICATE_KEY, NOT_A_FILE, OUTSIDE_FOLDER, TRUNCATED_TAR, UNREADABLE
from activation_store.tar_shards import IMAGE_EXTENSIONS, TarSamples, expand_braces, image_of, image_span


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
    # where the image's bytes live, for showing it again (the image table's data_url/offset/size)
    data_url: str | None = None
    data_offset: int = -1
    data_size: int = -1


@dataclass
class InputShard:
    name: str  # unique and stable: the store's shard `source`
    capacity: int  # the most images it can yield
    reader: object = field(repr=False, default=None)  # a callable returning an iterator of Sample
    aliases: tuple[str, ...] = ()  # names an older version gave the same shard (the path as typed)

    def samples(self) -> Iterator[Sample]:
        return self.reader()


# ---------------------------------------------------------------------------- folders
@dataclass
class _Entry:
    """One entry of an image folder: a file to read (`status` None) or one counted as dropped."""

    path: Path
    status: str | None = None
    error: str | None = None
    link: bool = False  # a symbolic link (to a regular file, when `status` is None)


def folder_shards(root: str, shard_size: int = 1000, follow_external_symlinks: bool = False) -> list[InputShard]:
    """Every entry under `root` (sorted, hidden ones skipped), in shards of `shard_size` entries.
    Non-image files are samples too: they are counted as `not_an_image`, not silently skipped; so
    are entries that are no regular file (`not_a_file`: FIFOs, sockets, devices, directories named
    like images, links to directories: never opened), links that leave the folder
    (`outside_folder`, unless `follow_external_symlinks`), and what cannot be read (`unreadable_file`)."""
    base = Path(root)
    if not base.is_dir():
        raise ConfigError(f"image folder {root} does not exist")
    try:
        entries = sorted(_walk(base, base.resolve(), follow_external_symlinks, top=True), key=lambda e: e.path)
    except OSError as exc:
        raise ConfigError(f"image folder {root} cannot be listed: {exc}") from exc
    readable = {e.path: e for e in entries if e.status is None}
    image_stems = {p.with_suffix("") for p in readable if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS}
    # a caption or metadata file beside an image belongs to that image; any other entry is a sample
    entries = [e for e in entries if not (e.status is None and e.path.suffix.lower() in (".txt", ".json")
                                          and e.path.with_suffix("") in image_stems)]
    if not entries:
        raise ConfigError(f"image folder {root} holds no files")
    shards = []
    for i in range(0, len(entries), shard_size):
        group = entries[i:i + shard_size]
        shards.append(InputShard(f"{base.resolve()}#{i // shard_size:05d}", len(group),
                                 _folder_reader(base, group, i, readable)))
    return shards


def _walk(directory: Path, inside: Path, follow_external: bool, top: bool = False) -> Iterator[_Entry]:
    """The entries under `directory`, classified without opening any of them. Symbolic links are
    resolved: one that leaves `inside` is `outside_folder` unless `follow_external`; links to
    directories are not searched."""
    try:
        with os.scandir(directory) as it:
            found = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        if top:
            raise
        yield _Entry(directory, UNREADABLE, f"cannot list this directory: {exc}")
        return
    for e in found:
        if e.name.startswith("."):
            continue
        path = directory / e.name
        try:
            if e.is_symlink():
                yield _linked(path, inside, follow_external)
            elif e.is_dir(follow_symlinks=False):
                if Path(e.name).suffix.lower().lstrip(".") in IMAGE_EXTENSIONS:
                    yield _Entry(path, NOT_A_FILE, "a directory named like an image (the files in it are samples of "
                                 "their own)")
                yield from _walk(path, inside, follow_external)
            elif e.is_file(follow_symlinks=False):
                yield _Entry(path)
            else:
                yield _Entry(path, NOT_A_FILE, f"{_kind(e.stat(follow_symlinks=False).st_mode)}, not a regular file: "
                             "never opened")
        except OSError as exc:
            yield _Entry(path, UNREADABLE, str(exc))


def _linked(path: Path, inside: Path, follow_external: bool) -> _Entry:
    target = Path(os.path.realpath(path))
    if not follow_external and not target.is_relative_to(inside):
        return _Entry(path, OUTSIDE_FOLDER, f"a symbolic link to {target}, outside the folder {inside}: not followed "
                      "(--follow-external-symlinks follows such links)", link=True)
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return _Entry(path, UNREADABLE, f"a broken symbolic link (to {target}): {exc.strerror or exc}", link=True)
    if stat.S_ISREG(mode):
        return _Entry(path, link=True)
    if stat.S_ISDIR(mode):
        return _Entry(path, NOT_A_FILE, f"a symbolic link to the directory {target}: not searched", link=True)
    return _Entry(path, NOT_A_FILE, f"a symbolic link to {_kind(mode)} ({target}), not a regular file: never opened",
                  link=True)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


def _read_regular(path: Path, link: bool) -> bytes | None:
    """A regular file's bytes; None when the path is no longer a regular file (it is opened without
    blocking, so a FIFO put in its place since the listing is never waited on, and a path that was
    no link when listed is not followed if it has become one)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if link else os.O_NOFOLLOW)
    with open(os.open(path, flags), "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        return f.read()


def _folder_reader(base: Path, entries: list[_Entry], offset: int, readable: dict[Path, _Entry]):
    def read() -> Iterator[Sample]:
        for j, entry in enumerate(entries):
            path, rel = entry.path, str(entry.path.relative_to(base))
            if entry.status is not None:
                yield Sample(rel, None, offset + j, url=str(path), status=entry.status, error=entry.error)
                continue
            try:
                data = _read_regular(path, entry.link)
            except OSError as exc:
                yield Sample(rel, None, offset + j, url=str(path), status=UNREADABLE, error=str(exc))
                continue
            if data is None:
                yield Sample(rel, None, offset + j, url=str(path), status=NOT_A_FILE,
                             error="no longer a regular file when it was read: not opened")
                continue
            caption = None
            side = readable.get(path.with_suffix(".txt"))
            if side is not None and side.path != path:
                try:
                    text = _read_regular(side.path, side.link)
                except OSError:
                    text = None
                caption = None if text is None else text.decode("utf-8", errors="replace").strip()
            yield Sample(rel, data, offset + j, url=str(path), caption=caption, data_url=os.path.abspath(path))

    return read


# ---------------------------------------------------------------------------- webdataset
def source_name(url: str, storage_options: dict | None = None) -> str:
    """The identity of a tar, whatever way it was typed: a local file by its resolved absolute path
    (`x.tar`, `./x.tar`, `/abs/x.tar` and `file:///abs/x.tar` are one shard), any other URL by its
    normalised form (the protocol's own name, lower-case scheme and host, no default port)."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        return str(Path(path).resolve())
    parts = urlsplit(fs.unstrip_protocol(path))
    netloc = parts.netloc.lower()
    if (parts.scheme, netloc.rpartition(":")[2]) in (("http", "80"), ("https", "443")):
        netloc = netloc.rpartition(":")[0]
    return urlunsplit((parts.scheme.lower(), netloc, parts.path, parts.query, parts.fragment))


def webdataset_shards(pattern: str, storage_options: dict | None = None) -> list[InputShard]:
    """One input shard per tar of a brace pattern (`data-{000..099}.tar`, local or any fsspec URL),
    named by `source_name`; the name as typed is kept as an alias (stores planned before names
    were normalised keep their shards)."""
    urls = expand_braces(pattern)
    names = [source_name(u, storage_options) for u in urls]
    repeated = sorted({n for n, c in Counter(names).items() if c > 1})
    if repeated:
        typed = sorted(u for u, n in zip(urls, names) if n in repeated)
        raise ConfigError(f"shard pattern {pattern} names the same tar more than once: {typed} are {repeated}")
    shards = []
    for url, name in zip(urls, names):
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        if not fs.exists(path):
            raise ConfigError(f"webdataset shard {url} does not exist")
        where = name if isinstance(fs, LocalFileSystem) else url  # local tars open by absolute path
        shards.append(InputShard(name, _tar_capacity(fs, path, where, storage_options),
                                 _tar_reader(where, name, storage_options), aliases=(url,) if url != name else ()))
    return shards


def _tar_capacity(fs, path: str, url: str, storage_options: dict | None) -> int:
    """Samples in the tar: from img2dataset's sidecar parquet when present, else by reading the
    tar's headers with the reader's own rules (a truncated tar: its readable samples and the
    truncation; later occurrences of a key are dropped, never stored, so they need no row)."""
    side = re.sub(r"\.tar$", ".parquet", path)
    if side != path and fs.exists(side):
        import pyarrow.parquet as pq

        with fs.open(side, "rb") as f:
            table = pq.read_table(f, columns=["status"])
        return max(1, sum(1 for s in table["status"].to_pylist() if s == "success"))
    tar = TarSamples(url, storage_options, keys_only=True)
    n = sum(1 for _ in tar)
    return max(1, n + (1 if tar.truncated is not None else 0))


def _tar_reader(url: str, name: str, storage_options: dict | None):
    def read() -> Iterator[Sample]:
        tar = TarSamples(url, storage_options, duplicates=True)
        row = -1
        for row, sample in enumerate(tar):
            if sample.duplicate is not None:
                yield Sample(sample.key, None, row, status=DUPLICATE_KEY, error=f"{name}: {sample.duplicate}")
                continue
            meta = {}
            if "json" in sample.files:
                try:
                    meta = json.loads(sample.files["json"])
                except (ValueError, UnicodeDecodeError):
                    meta = {}
            caption = meta.get("caption")
            if caption is None and "txt" in sample.files:
                caption = sample.files["txt"].decode("utf-8", errors="replace")
            start, size = image_span(sample)
            yield Sample(sample.key, image_of(sample.files), row, url=meta.get("url"), caption=caption,
                         data_url=name, data_offset=start, data_size=size)
        if tar.truncated is not None:
            # the sample being read may be incomplete: it is lost with the rest of the tar
            yield Sample(f"{name}:truncated", None, row + 1, status=TRUNCATED_TAR,
                         error=f"{tar.truncated}; later samples of this tar are lost")

    return read
