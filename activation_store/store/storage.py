"""Where a store lives: a local directory or an object-store URL (`s3://bucket/prefix`), seen
through fsspec for our own bookkeeping objects and through a zarr store for the arrays.

Every write of the package goes through here, so a full disk, a read-only file system or a
refused permission becomes one StorageWriteError that says what to do, never a raw OSError.

Every read of an object's bytes goes through `read_bytes` / `read_many`: a GET that fails with a
transient error (a 5xx, a reset connection, a timeout, a GET slower than the policy's timeout)
is retried with exponential back-off and jitter (`ReadPolicy`); an object that keeps failing
raises ChunkReadError naming it. On S3-compatible stores these GETs go through obstore
(`object_reads.py`: bodies received without the GIL, 2-14x s3fs's rate beside busy Python
threads); elsewhere, or with options only s3fs understands, through a filesystem instance of
their own. Neither client retries by itself (botocore's and s3fs's own retries would multiply
ours and hide a dead endpoint for minutes). A `Prefetcher` GETs objects ahead of their use, a bounded
number at a time; `read_bytes` hands out what it fetched."""

from __future__ import annotations

import copy
import errno
import os
import posixpath
import random
import re
import threading
import time
import uuid
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import fsspec.asyn
import zarr
import zarr.storage

from activation_store.errors import ActivationStoreError, ChunkReadError, StorageWriteError
from activation_store.faults import kill_point
from activation_store.store.chunk_io import FramedPayload
from activation_store.store.object_reads import getter_for

TMP_MARK = ".tmp-"  # write_bytes writes `<key>.tmp-<32 hex digits>`, then renames it over `<key>`
_TMP = re.compile(r"\.tmp-[0-9a-f]{32}$")
_UNKNOWN = object()  # not looked at yet


def is_temporary(key: str) -> bool:
    """Whether `key` names a temporary object of our own atomic writes (and nothing else)."""
    return bool(_TMP.search(key))


def temporary_target(key: str) -> str:
    """The key a temporary object was going to replace."""
    return _TMP.sub("", key)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _mount_point(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


@dataclass(frozen=True)
class ReadPolicy:
    """How one object's read is retried: `attempts` tries in all, waiting `backoff` seconds before
    the second (doubling each time, at most `max_backoff`, with full jitter); one attempt on an
    object store that takes longer than `timeout` seconds is abandoned and counts as failed."""

    attempts: int = 5
    backoff: float = 0.1
    max_backoff: float = 2.0
    timeout: float | None = 60.0

    def delay(self, failed: int) -> float:
        """Seconds to wait after the `failed`-th failed attempt (1, 2, ...)."""
        return random.uniform(0.5, 1.0) * min(self.max_backoff, self.backoff * 2 ** (failed - 1))


# errors that say the object is absent or may not be read: another attempt cannot change them
_FINAL_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ActivationStoreError)


def _read_options(protocol: str, options: dict) -> dict:
    """Storage options for the filesystem that reads objects: the same, with the S3 client's own
    retries off (ours replace them), a connection pool as large as a reader's concurrency,
    whole-object GETs (s3fs would split a large object into ranged GETs after a HEAD), and no
    response checksum beyond what the format checks itself. Explicit settings are kept."""
    opts = copy.deepcopy(options)
    if protocol in ("s3", "s3a"):
        ck = dict(opts.get("config_kwargs") or {})
        ck.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
        ck.setdefault("max_pool_connections", 64)
        # every chunk carries its own CRC-32C, checked by its decoder: the SDK's second checksum of
        # each response costs ~30% of a client core (its single event-loop thread is what limits
        # GET throughput)
        ck.setdefault("response_checksum_validation", "when_required")
        opts["config_kwargs"] = ck
        opts.setdefault("max_concurrency", 1)  # one GET an object, no HEAD before it (readers run GETs in parallel)
    return opts


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
        self.read_policy = ReadPolicy()  # retries of reads not made through a Prefetcher
        self._read_fs = None
        self._getter = _UNKNOWN  # obstore's GETs (object_reads.py), None where they do not apply
        self._fs_lock = threading.Lock()
        self._prefetch_lock = threading.Lock()
        self._prefetchers: list[Prefetcher] = []
        self.get_attempts = 0  # object reads attempted (retries included; a running count)

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

    # ---------------------------------------------------------------- errors
    def write_error(self, exc: OSError, key: str, doing: str = "writing") -> StorageWriteError:
        """A refused write as our own one-line error that says what happened and what to do."""
        obj = key or "the store"
        code = getattr(exc, "errno", None)
        if code in (errno.ENOSPC, errno.EDQUOT):
            where = _mount_point(self.path(key)) if self.is_local else self.url
            what = "no space left" if code == errno.ENOSPC else "disk quota exceeded"
            return StorageWriteError(
                f"{what} on {where} {doing} {obj} of {self.url}; free space and rerun the same command: committed "
                f"shards are kept, the shard that was being written is redone")
        if code == errno.EROFS:
            return StorageWriteError(
                f"{self.url} is on a read-only file system ({doing} {obj}); remount it read-write or choose another "
                f"path, then rerun the same command: committed shards are kept")
        if code in (errno.EACCES, errno.EPERM) or isinstance(exc, PermissionError):
            return StorageWriteError(
                f"{self.path(key)} is not writable (permission denied {doing} {obj}); give this user write access "
                f"(or credentials that may write there) and rerun the same command: committed shards are kept")
        return StorageWriteError(
            f"{doing} {obj} of {self.url} failed ({exc.strerror or exc}); fix the storage and rerun the same command: "
            f"committed shards are kept")

    # ---------------------------------------------------------------- reads and listings
    def exists(self, key: str = "") -> bool:
        """Whether the object (or folder) is there now: on object stores not from a listing this
        filesystem cached earlier, which would keep answering False for an object written since
        (another process's, e.g. rank 0's store seen by a waiting rank)."""
        self._forget_listing(key)
        return self.fs.exists(self.path(key))

    def is_file(self, key: str = "") -> bool:
        self._forget_listing(key)
        return self.fs.isfile(self.path(key))

    def _forget_listing(self, key: str) -> None:
        if not self.is_local:
            self.fs.invalidate_cache(self.path(key))  # the key's own entry and its folders'

    def read_fs(self):
        """The filesystem our object reads go through (on object stores: one whose client does not
        retry by itself; see the module docstring)."""
        if self.is_local:
            return self.fs
        with self._fs_lock:  # one client, however many threads ask for it first
            if self._read_fs is None:
                protocol = self.url.split("://", 1)[0]
                fs, _ = fsspec.core.url_to_fs(self.url, skip_instance_cache=True,
                                              **_read_options(protocol, self.storage_options))
                if protocol in ("s3", "s3a"):
                    fs.retries = 1  # s3fs's own retry loop, besides botocore's
                self._read_fs = fs
        return self._read_fs

    def object_getter(self):
        """The obstore client our GETs use on this store, or None (fsspec's read client then)."""
        if self.is_local:
            return None
        with self._fs_lock:
            if self._getter is _UNKNOWN:
                self._getter = getter_for(self.url.split("://", 1)[0], self.storage_options)
        return self._getter

    def connect(self) -> None:
        """Set up the read client now (an S3 client takes ~0.1-0.2 s to create), not at the first
        read. Errors are left to the reads, which retry and name what failed."""
        if self.is_local:
            return
        try:
            if self.object_getter() is not None:
                return
            fs = self.read_fs()
            if hasattr(fs, "connect"):
                fs.connect()
        except Exception:
            pass

    def _get_once(self, path: str, timeout: float | None):
        getter = self.object_getter()
        with self._count_lock:
            self.get_attempts += 1
        if getter is not None:
            return getter.get(path, timeout)
        fs = self.read_fs()
        if timeout and getattr(fs, "async_impl", False) and getattr(fs, "loop", None) is not None:
            return fsspec.asyn.sync(fs.loop, fs._cat_file, path, timeout=timeout)
        return fs.cat_file(path)

    def get(self, key: str, policy: ReadPolicy | None = None):
        """The object's bytes (None when absent) as a buffer (bytes, or obstore's), retried by
        `policy` (default: `read_policy`); ChunkReadError, naming the object, when every attempt
        failed. Counts no bytes."""
        policy = policy or self.read_policy
        path = self.path(key)
        failed, last = 0, None
        while True:
            try:
                return self._get_once(path, policy.timeout)
            except FileNotFoundError:
                return None
            except _FINAL_ERRORS:
                raise
            except Exception as exc:  # a 5xx, a reset or refused connection, a timeout, a short read
                failed, last = failed + 1, exc
            if failed >= policy.attempts:
                break
            time.sleep(policy.delay(failed))
        what = f"{self.url}/{key}" if key else self.url
        raise ChunkReadError(
            f"{what}: {failed} reads failed, the last with {type(last).__name__}: {last}; check the storage "
            f"(endpoint, network, credentials) and retry; more tries: the reader's io_attempts") from last

    def _take_prefetched(self, key: str) -> Future | None:
        if not self._prefetchers:
            return None
        with self._prefetch_lock:
            for p in self._prefetchers:
                fut = p._take(key)
                if fut is not None:
                    return fut
        return None

    def read_bytes(self, key: str, count: bool = True, buffer: bool = False):
        """The object's bytes, None when absent. `buffer`: any buffer will do (what the GET gave,
        uncopied: chunk decoders read it with numpy); else `bytes`."""
        fut = self._take_prefetched(key)
        if fut is not None and not fut.cancelled():
            try:
                data = fut.result()
            except CancelledError:  # its prefetcher was closed meanwhile
                data = self.get(key)
        else:
            data = self.get(key)
        if data is None:
            return None
        if count:
            self.count_read(len(data))
        return data if buffer or isinstance(data, bytes) else bytes(data)

    def read_many(self, keys: list[str]) -> dict[str, bytes | None]:
        """{key: bytes or None when absent}; concurrent requests on object stores, each failed one
        retried by `read_policy`."""
        if self.is_local or len(keys) < 2:
            return {k: self.read_bytes(k, count=False) for k in keys}
        paths = {self.path(k): k for k in keys}
        try:
            got = self.read_fs().cat(list(paths), on_error="return")
        except Exception:  # the batch itself failed: read them one by one
            got = {}
        out = {}
        for p, k in paths.items():
            v = got.get(p, got.get(p.lstrip("/")))
            if isinstance(v, FileNotFoundError):
                out[k] = None
            elif isinstance(v, _FINAL_ERRORS):
                raise v
            elif v is None or isinstance(v, BaseException):
                out[k] = self.read_bytes(k, count=False)  # bytes, whichever client GETs it
            else:
                out[k] = v
        return out

    def prefetcher(self, keys, depth: int, concurrency: int, policy: ReadPolicy | None = None) -> Prefetcher:
        """GET `keys` ahead of their use (see Prefetcher); close it when done."""
        return Prefetcher(self, keys, depth, concurrency, policy or self.read_policy)

    def read_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        """(content, version): the version is the object's ETag on object stores (None on local disks),
        taken before the content, so a conditional write against it fails if the content changed."""
        if self.is_local:
            return self.read_bytes(key, count=False), None
        try:
            version = self.fs.info(self.path(key), refresh=True).get("ETag")
        except FileNotFoundError:
            return None, None
        return self.read_bytes(key, count=False), version

    def modified_at(self, key: str) -> float | None:
        """The object's modification time (seconds since the epoch), None when absent."""
        try:
            if self.is_local:
                return os.stat(self.path(key)).st_mtime
            info = self.fs.info(self.path(key), refresh=True)
        except FileNotFoundError:
            return None
        when = info.get("LastModified") or info.get("mtime")
        return when.timestamp() if hasattr(when, "timestamp") else (float(when) if when is not None else None)

    def list_dir(self, prefix: str = "") -> list[str]:
        """Names of the objects and folders directly under `prefix` (sorted; [] when there is none)."""
        base = self.path(prefix)
        if self.is_local:
            try:
                return sorted(os.listdir(base))
            except (FileNotFoundError, NotADirectoryError):
                return []
        self.fs.invalidate_cache(base)
        try:
            entries = self.fs.ls(base, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        here = base.rstrip("/")
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries if e.rstrip("/") != here)

    def list_files(self, prefix: str) -> dict[str, int]:
        """{key relative to the root: size} for every object under `prefix`."""
        base = self.path(prefix)
        if not self.is_local:
            self.fs.invalidate_cache(base)
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

    # ---------------------------------------------------------------- writes
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write an object so that a reader sees either the old or the new content, never half."""
        path = self.path(key)
        try:
            if self.is_local:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex}"
                try:
                    with open(tmp, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    kill_point("atomic_write")
                    os.replace(tmp, path)
                except BaseException:
                    _remove_quietly(tmp)  # ours, and never renamed: a full disk gets its space back
                    raise
            else:
                self.fs.pipe_file(path, data)  # a single PUT is atomic on object stores
        except OSError as exc:
            raise self.write_error(exc, key) from exc

    def write_chunk(self, key: str, obj: FramedPayload) -> None:
        """Write a chunk object (on local disks its checksum is computed as it is written). Not
        atomic on local disks: chunks are only read once their shard is committed, and a rerun of
        an uncommitted shard rewrites them."""
        path = self.path(key)
        try:
            if self.is_local:
                self._write_local_chunk(path, obj)
            else:
                self.fs.pipe_file(path, b"".join(bytes(memoryview(p).cast("B")) for p in obj.parts()))
        except OSError as exc:
            raise self.write_error(exc, key) from exc

    @staticmethod
    def _write_local_chunk(path: str, obj: FramedPayload) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            obj.write_to(fd)
        except BaseException:
            os.close(fd)
            _remove_quietly(path)  # a chunk of an uncommitted shard, cut short: give its space back
            raise
        os.close(fd)

    def create_exclusive(self, key: str, data: bytes) -> str | None:
        """Write a new object only if there is none at `key` (FileExistsError otherwise): an exclusive
        create on local disks, a conditional PUT (`If-None-Match: *`) on object stores. Returns the
        object's version (its ETag) on object stores, None on local disks."""
        path = self.path(key)
        try:
            if not self.is_local:
                out = self.fs.pipe_file(path, data, mode="create")
                return out.get("ETag") if isinstance(out, dict) else None
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                _remove_quietly(path)
                raise
            os.close(fd)
            return None
        except FileExistsError:
            raise
        except OSError as exc:
            raise self.write_error(exc, key) from exc

    def replace_if(self, key: str, data: bytes, version: str | None) -> tuple[bool, str | None]:
        """Replace the object at `key` if it is still at `version` (a conditional PUT, `If-Match`, on
        object stores; local disks replace it atomically, the caller holding the object's lock).
        Returns (replaced, new version)."""
        if self.is_local or version is None:
            self.write_bytes(key, data)
            return True, None
        try:
            out = self.fs.pipe_file(self.path(key), data, IfMatch=version)
        except OSError as exc:
            if exc.errno == errno.EINVAL or isinstance(exc, FileNotFoundError):  # 412: it changed
                return False, None
            raise self.write_error(exc, key) from exc
        return True, out.get("ETag") if isinstance(out, dict) else None

    def delete_if(self, key: str, version: str | None) -> bool:
        """Delete the object at `key` if it is still at `version` (object stores; local disks delete it)."""
        if self.is_local or version is None or not hasattr(self.fs, "call_s3"):
            self.delete([key])
            return True
        bucket, obj, _ = self.fs.split_path(self.path(key))
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=obj, IfMatch=version)
        except OSError as exc:
            if exc.errno == errno.EINVAL or isinstance(exc, FileNotFoundError):
                return False
            raise self.write_error(exc, key, "deleting") from exc
        self.fs.invalidate_cache(self.path(key))
        return True

    def delete(self, keys: list[str]) -> None:
        key = keys[0] if keys else ""
        try:
            if self.is_local:
                for key in keys:
                    try:
                        os.remove(self.path(key))
                    except FileNotFoundError:
                        pass
            else:
                existing = [self.path(k) for k in keys if self.fs.exists(self.path(k))]
                if existing:
                    self.fs.rm(existing)
        except OSError as exc:
            raise self.write_error(exc, key, "deleting") from exc

    def remove_empty_folders(self, keys: list[str]) -> None:
        """Local disks: remove the folders of deleted `keys` that are empty now, up to the root (only
        empty folders: os.rmdir refuses any other)."""
        if not self.is_local:
            return
        for key in keys:
            folder = os.path.dirname(self.path(key))
            while folder.startswith(self.root + os.sep):
                try:
                    os.rmdir(folder)
                except OSError:
                    break
                folder = os.path.dirname(folder)

    def clean_temporaries(self, prefix: str) -> list[str]:
        """Delete the stale temporaries of our own atomic writes under `prefix` (objects named
        `<key>.tmp-<32 hex digits>`, and nothing else); returns their keys. Object stores have none:
        a PUT is atomic there."""
        if not self.is_local:
            return []
        stale = [k for k in self.list_files(prefix) if is_temporary(k)]
        self.delete(stale)
        return stale


class Prefetcher:
    """GETs objects in the order given, `concurrency` at a time, ahead of their use: at most
    `depth` fetched (or being fetched) and not yet taken, so memory stays at `depth` objects.
    `Storage.read_bytes` of one of its keys takes the result (the bytes, or the ChunkReadError of
    a GET that kept failing) and lets it start the next GET; a key asked for before its turn is
    fetched at once, by the same threads and with the same retries. `close()` stops it: queued
    GETs are dropped, a running one ends with its current attempt."""

    def __init__(self, storage: Storage, keys, depth: int, concurrency: int, policy: ReadPolicy) -> None:
        self.storage, self.policy = storage, policy
        self.depth = max(1, int(depth))
        self._keys = list(keys)
        self._unsent = set(self._keys)
        self._next = 0
        self._futures: dict[str, Future] = {}
        self._closed = False
        self._pool = ThreadPoolExecutor(max(1, int(concurrency)), thread_name_prefix="actstore-get")
        with storage._prefetch_lock:
            storage._prefetchers.append(self)
            self._top_up()

    def _fetch(self, key: str) -> bytes | None:
        return self.storage.get(key, self.policy)

    def _top_up(self) -> None:  # holding the storage's prefetch lock
        while not self._closed and len(self._futures) < self.depth and self._next < len(self._keys):
            key = self._keys[self._next]
            self._next += 1
            if key in self._unsent:
                self._unsent.discard(key)
                self._futures[key] = self._pool.submit(self._fetch, key)

    def _take(self, key: str) -> Future | None:  # holding the storage's prefetch lock
        fut = self._futures.pop(key, None)
        if fut is None and key in self._unsent and not self._closed:  # wanted before its turn
            self._unsent.discard(key)
            fut = self._pool.submit(self._fetch, key)
        if fut is not None:
            self._top_up()
        return fut

    @property
    def pending(self) -> int:
        """Objects fetched or being fetched, not yet taken."""
        return len(self._futures)

    def close(self) -> None:
        with self.storage._prefetch_lock:
            self._closed = True
            if self in self.storage._prefetchers:
                self.storage._prefetchers.remove(self)
            self._futures.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
