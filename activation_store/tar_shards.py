"""Webdataset tar shards, read without webdataset: the one tar reader of the package, shared by the
harvest (its input shards) and the SAE report (a top-activating image by key).

Members are grouped into samples by the webdataset convention: consecutive files that share a key
(the path up to the first dot of the file name) form one sample, `{extension: bytes}` with the
extension lower-cased (`000001.jpg`, `000001.json` -> key `000001`, files `jpg`, `json`). Reading
streams (`tarfile` mode `r|*`, so gzip/bz2/xz too) over any fsspec URL or an open binary file.

A tar that ends early (a cut download, a partial copy) is not an exception: the samples read so far
are yielded, the sample being read when it ended is dropped (it may be incomplete), and
`TarSamples.truncated` says what went wrong. A tar that lacks its end-of-archive blocks counts as
truncated too, so a tar cut exactly between two members is caught as well.

Keys are unique within a tar: the first occurrence wins. A key that comes back after other samples
(`a.jpg b.jpg a.jpg`) and a sample's second file of one kind (`a.jpg a.jpg`) are later
occurrences: never merged into the first one, not yielded by default, and yielded as samples with
`duplicate` set (the text says which key and where; no files) with `duplicates=True`, so a caller
can count them.

Imports neither torch, open_clip, webdataset nor the harvest: the SAE package uses it."""

from __future__ import annotations

import contextlib
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import fsspec
from braceexpand import UnbalancedBracesError, braceexpand

from activation_store.errors import ConfigError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# what a damaged or cut tar raises while it is read (OSError: a failing network read, a gzip error)
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError)
# what tarfile raises for a header block that is missing or cut short; past the first member it
# takes either for the end of the archive, whereas a whole tar ends with zero blocks
_CUT_HEADER_ERRORS = (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError)


def expand_braces(pattern: str) -> list[str]:
    """Shell brace expansion of a shard pattern: `shard-{000..003}.tar` -> 4 names (zero padding
    kept), `{a,b}` alternatives, nested braces and several groups (`{a,b}-{00..01}`)."""
    try:
        return list(braceexpand(pattern))
    except UnbalancedBracesError as exc:
        raise ConfigError(f"shard pattern {pattern!r}: {exc}") from exc


def split_key(name: str) -> tuple[str, str]:
    """A member's (key, extension): the key is the path up to the first dot of the file name, the
    extension the rest, lower-cased (`a/b/000.seg.PNG` -> (`a/b/000`, `seg.png`))."""
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def image_extension(files: dict) -> str | None:
    """Which file of a sample is its image: the first of IMAGE_EXTENSIONS it has; None when none."""
    return next((e for e in IMAGE_EXTENSIONS if e in files), None)


def image_of(files: dict[str, bytes]) -> bytes | None:
    """The image file of a sample; None when it has none."""
    ext = image_extension(files)
    return None if ext is None else files[ext]


@dataclass
class TarSample:
    """One sample of a tar: its key and its files by extension. `duplicate`, set only for a later
    occurrence of a key or of a file (with `TarSamples(duplicates=True)`), says which and where."""

    key: str
    files: dict[str, bytes]
    duplicate: str | None = None
    # where each file's bytes lie in the tar: (offset, size), for ranged reads of the image later;
    # absent for a compressed tar, whose offsets are in the decompressed stream
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)


def image_span(sample: TarSample) -> tuple[int, int]:
    """(offset, size) of a sample's image in its tar; (-1, -1) when unknown (a compressed tar)."""
    ext = image_extension(sample.files or sample.spans)
    return sample.spans.get(ext, (-1, -1)) if ext else (-1, -1)


class TarSamples:
    """The samples of one tar, in tar order, streamed: `for sample in TarSamples(url): ...`.

    `source` is an fsspec URL or path (opened with `storage_options`) or an open binary file.
    After an iteration, `truncated` is None when the tar was read to its end, else the error that
    ended it early (`"ReadError: unexpected end of data"`): the sample it was in is not yielded.
    A source that cannot be opened at all (no such file) raises, as fsspec does; one that opens but
    is empty or not a tar is truncated at byte 0.
    With `keys_only`, files are not read (`files` is empty): the keys, or the count, of a large tar
    for the cost of streaming through it. With `duplicates`, the later occurrences of keys and files
    are yielded too (`duplicate` set): a repeated key where it comes back, a sample's second file of
    one kind right after that sample."""

    def __init__(self, source: str | os.PathLike | BinaryIO, storage_options: dict | None = None, *,
                 keys_only: bool = False, duplicates: bool = False) -> None:
        self.source, self.storage_options, self.keys_only = source, storage_options or {}, keys_only
        self.duplicates = duplicates
        self.truncated: str | None = None

    def _open(self):
        if hasattr(self.source, "read"):
            return contextlib.nullcontext(self.source)
        return fsspec.open(os.fspath(self.source), "rb", **self.storage_options)

    def __iter__(self) -> Iterator[TarSample]:
        self.truncated = None
        cut: list[str] = []  # set when tarfile took a missing or cut header for the end of the archive

        class _Header(tarfile.TarInfo):
            @classmethod
            def frombuf(cls, buf, encoding, errors):
                try:
                    return super().frombuf(buf, encoding, errors)
                except _CUT_HEADER_ERRORS:
                    cut.append("ReadError: the tar ends without its end-of-archive blocks")
                    raise

        current: TarSample | None = None  # the sample being read
        extensions: set[str] = set()  # its files so far
        again: list[TarSample] = []  # its second files of one kind (later occurrences)
        repeat: TarSample | None = None  # a key seen before, come back after other samples: skipped
        seen: set[str] = set()
        with self._open() as f:
            try:
                with tarfile.open(fileobj=f, mode="r|*", tarinfo=_Header) as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        key, ext = split_key(member.name)
                        if current is not None and current.key != key:
                            yield current  # complete: the next sample's first file has begun
                            yield from again if self.duplicates else ()
                            current, again = None, []
                        if repeat is not None and repeat.key != key:
                            if self.duplicates:
                                yield repeat
                            repeat = None
                        if current is None and repeat is None:
                            if key in seen:
                                repeat = TarSample(key, {}, _later(key, member, "comes back after other samples"))
                                continue
                            seen.add(key)
                            current, extensions = TarSample(key, {}), set()
                        if repeat is not None:
                            continue
                        if ext in extensions:
                            again.append(TarSample(key, {}, _later(key, member, f"has a second {ext!r} file")))
                            continue
                        extensions.add(ext)
                        if getattr(tar.fileobj, "comptype", "tar") == "tar":  # an uncompressed tar
                            current.spans[ext] = (member.offset_data, member.size)
                        if not self.keys_only:
                            current.files[ext] = tar.extractfile(member).read()
            except _TAR_ERRORS as exc:
                self.truncated = f"{type(exc).__name__}: {exc}"
                return
        if cut:
            self.truncated = cut[0]
        elif current is not None:
            yield current
            yield from again if self.duplicates else ()
        elif repeat is not None and self.duplicates:
            yield repeat


def _later(key: str, member: tarfile.TarInfo, how: str) -> str:
    return (f"key {key!r} {how} at tar member {member.name!r} (offset {member.offset}); the first occurrence is "
            f"kept, this later one is dropped")


def read_sample(url: str | os.PathLike | BinaryIO, key: str, storage_options: dict | None = None) -> dict[str, bytes] | None:
    """The files of the sample `key` of a tar, by extension, or None when the tar (its readable
    part, if it is truncated) holds no such sample. Reads the tar up to that sample; a tar that
    cannot be opened raises (FileNotFoundError for a missing one)."""
    for sample in TarSamples(url, storage_options):
        if sample.key == key:
            return sample.files
    return None
