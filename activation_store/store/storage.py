"""Where a store lives: a local directory or an object-store URL (`s3://bucket/prefix`), seen
through fsspec for our own bookkeeping objects and through a zarr store for the arrays."""

from __future__ import annotations

import os
import posixpath
import threading
import uuid

import fsspec
import zarr
import zarr.storage


class Storage:
    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.storage_options = dict(storage_options or {})
        url = str(url)
        if url.startswith("file://"):
            url = url[len("file://"):]
        self.is_local = "://" not in url
        if self.is_local:
            self.url = os.path.abspath(url)
            self.fs = fsspec.filesystem("file")
            self.root = self.url
        else:
            self.url = url.rstrip("/")
            # A private instance: fsspec's cache would otherwise hand zarr and us one filesystem
            # bound to whichever event loop created it first.
            self.fs, self.root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True, **self.storage_options)
        self._zarr_store = None
        self.bytes_read = 0  # bytes fetched from storage by our own read paths (a running count)
        self._count_lock = threading.Lock()

    def count_read(self, n: int) -> None:
        with self._count_lock:
            self.bytes_read += n

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def zarr_store(self):
        if self._zarr_store is None:
            if self.is_local:
                self._zarr_store = zarr.storage.LocalStore(self.root)
            else:
                self._zarr_store = zarr.storage.FsspecStore.from_url(self.url, storage_options=self.storage_options)
        return self._zarr_store

    def path(self, key: str) -> str:
        return posixpath.join(self.root, key) if key else self.root

    def exists(self, key: str = "") -> bool:
        return self.fs.exists(self.path(key))

    def read_bytes(self, key: str) -> bytes | None:
        try:
            data = self.fs.cat_file(self.path(key))
        except FileNotFoundError:
            return None
        self.count_read(len(data))
        return data

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write an object so that a reader sees either the old or the new content, never half."""
        path = self.path(key)
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)  # a single PUT is atomic on object stores

    def write_chunk(self, key: str, parts: list) -> None:
        """Write a chunk object from buffers. Not atomic on local disks: chunks are only read once
        their shard is committed, and a rerun of an uncommitted shard rewrites them."""
        path = self.path(key)
        if self.is_local:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                views = [memoryview(p).cast("B") for p in parts]
                total = sum(v.nbytes for v in views)
                written = os.writev(fd, views)
                if written != total:  # short write: finish the rest
                    data = b"".join(bytes(v) for v in views)[written:]
                    while data:
                        data = data[os.write(fd, data):]
            finally:
                os.close(fd)
        else:
            self.fs.pipe_file(path, b"".join(bytes(memoryview(p).cast("B")) for p in parts))

    def delete(self, keys: list[str]) -> None:
        paths = [self.path(k) for k in keys]
        if self.is_local:
            for p in paths:
                try:
                    os.remove(p)
                except FileNotFoundError:
                    pass
        else:
            existing = [p for p in paths if self.fs.exists(p)]
            if existing:
                self.fs.rm(existing)

    def list_files(self, prefix: str) -> dict[str, int]:
        """{key relative to the root: size} for every object under `prefix`."""
        base = self.path(prefix)
        if not self.fs.exists(base):
            return {}
        found = self.fs.find(base, detail=True)
        root = self.root.rstrip("/") + "/"
        out = {}
        for p, info in found.items():
            p = p if p.startswith("/") or not self.is_local else "/" + p
            key = p[len(root):] if p.startswith(root) else p.split(root.lstrip("/"), 1)[-1]
            out[key] = int(info.get("size") or 0)
        return out
