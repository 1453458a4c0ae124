"""One writer per input shard at a time: a claim object `shards/sNNNNNN/writer.claim`.

A writer creates the claim before it touches the shard, exclusively: `O_CREAT | O_EXCL` on local
disks, a conditional PUT (`If-None-Match: *`) on object stores. It holds the holder's pid, host and
times, and is refreshed while the writer writes; it is removed on commit and on a clean close after
an error. A claim whose holder died is stale and may be taken over: on the holder's own machine
(same host, boot and pid namespace), when its process no longer exists; elsewhere, when it has not
been refreshed for its `timeout_s`. Taking over is race-free: on object stores a conditional PUT
(`If-Match` the stale claim's ETag); on local disks under a second exclusive object
(`writer.claim.break`), after checking the claim did not change. docs/format.md, "Claims"."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from datetime import datetime, timezone

from activation_store.errors import ShardClaimedError
from activation_store.store import layout

DEFAULT_CLAIM_TIMEOUT_S = 3600.0
_BREAK = ".break"


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _machine() -> str:
    """This machine and pid namespace: pids mean the same process only where this is equal."""
    boot = _read_text("/proc/sys/kernel/random/boot_id")
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    return f"{boot}/{ns}" if boot and ns else ""


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot), None when unknown; None-or-different
    from a claim's means a different process that reuses the pid."""
    stat = _read_text(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


def _process_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user
    stat = _read_text(f"/proc/{pid}/stat")
    if stat and stat.rpartition(")")[2].split()[:1] == ["Z"]:
        return False  # a zombie: dead, not yet reaped
    return start is None or _process_start(pid) in (None, start)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


class ShardClaim:
    """The claim of one input shard by one writer (see the module docstring)."""

    def __init__(self, storage, shard, timeout_s: float = DEFAULT_CLAIM_TIMEOUT_S) -> None:
        self.storage = storage
        self.shard = shard
        self.timeout_s = float(timeout_s)
        self.key = f"{layout.shard_group_key(shard.index)}/{layout.CLAIM}"
        self.token = uuid.uuid4().hex
        self.held = False
        self._version: str | None = None  # the ETag of our claim object (object stores)
        self._claimed_at = time.time()
        self._refreshed = 0.0  # time.monotonic() of the last refresh

    # ---------------------------------------------------------------- the claim object
    def _document(self) -> bytes:
        now = time.time()
        pid = os.getpid()
        return json.dumps({
            "shard": self.shard.name, "source": self.shard.source, "token": self.token,
            "pid": pid, "host": socket.gethostname(), "machine": _machine(), "pid_start": _process_start(pid),
            "claimed_at": _iso(self._claimed_at), "refreshed_at": _iso(now), "refreshed_unix": now,
            "timeout_s": self.timeout_s,
        }, indent=2).encode()

    @staticmethod
    def _parse(data: bytes | None) -> dict | None:
        try:
            doc = json.loads(data)
        except (TypeError, ValueError):
            return None
        return doc if isinstance(doc, dict) and "token" in doc else None

    def _stale(self, doc: dict | None, key: str) -> bool:
        """Whether the holder of the claim object `doc` (at `key`) is gone."""
        if doc is None:  # cut short while being written, or damaged: judge by its age alone
            when = self.storage.modified_at(key)
            return when is not None and time.time() - when > DEFAULT_CLAIM_TIMEOUT_S
        machine = _machine()
        if machine and doc.get("host") == socket.gethostname() and doc.get("machine") == machine:
            return not _process_alive(int(doc.get("pid", -1)), doc.get("pid_start"))
        try:
            age = time.time() - float(doc["refreshed_unix"])
            timeout = float(doc.get("timeout_s", DEFAULT_CLAIM_TIMEOUT_S))
        except (KeyError, TypeError, ValueError):
            return False
        return age > timeout

    def _held_by(self, doc: dict | None, key: str) -> str:
        if doc is None:
            return (f"{self.storage.path(key)} exists but is unreadable (a claim being written, or damaged); if no "
                    f"writer of this shard runs, delete it and rerun")
        held = (f"pid {doc.get('pid')} on host {doc.get('host')} holds it since {doc.get('claimed_at')} (last refreshed "
                f"{doc.get('refreshed_at')})")
        if doc.get("pid") == os.getpid() and doc.get("host") == socket.gethostname() and doc.get("machine") == _machine():
            return f"{held}: this process, through another writer of the shard that is still open; commit or close() it first"
        return (f"{held}; wait for that writer to finish, or stop it: a claim whose process is gone is taken over at "
                f"once on its host, and elsewhere once it has not been refreshed for "
                f"{float(doc.get('timeout_s', DEFAULT_CLAIM_TIMEOUT_S)):.0f} s")

    def _refused(self, why: str) -> ShardClaimedError:
        return ShardClaimedError(
            f"input shard {self.shard.source!r} ({self.shard.name}) of {self.storage.url} is being written by another "
            f"writer: {why}")

    # ---------------------------------------------------------------- acquire / refresh / release
    def acquire(self) -> None:
        for _ in range(5):
            try:
                self._version = self.storage.create_exclusive(self.key, self._document())
            except FileExistsError:
                pass
            else:
                self.held, self._refreshed = True, time.monotonic()
                return
            data, version = self.storage.read_versioned(self.key)
            if data is None:
                continue  # released in between: try again
            doc = self._parse(data)
            if not self._stale(doc, self.key):
                raise self._refused(self._held_by(doc, self.key))
            if self._take_over(data, version):
                self.held, self._refreshed = True, time.monotonic()
                return
        raise self._refused("other writers keep claiming it at the same time; rerun")

    def _take_over(self, stale: bytes, version: str | None) -> bool:
        """Replace the stale claim `stale` by ours, unless it changed meanwhile."""
        if not self.storage.is_local:
            ok, self._version = self.storage.replace_if(self.key, self._document(), version)
            return ok
        lock = self.key + _BREAK
        try:
            self.storage.create_exclusive(lock, self._document())
        except FileExistsError:
            data = self.storage.read_bytes(lock, count=False)
            doc = self._parse(data)
            if data is not None and self._stale(doc, lock):
                self.storage.delete([lock])  # a taker-over that died: retry
                return False
            raise self._refused(f"another writer is taking over its stale claim ({self._held_by(doc, lock)})") from None
        try:
            if self.storage.read_bytes(self.key, count=False) != stale:
                return False  # refreshed, released or taken meanwhile: look again
            self.storage.delete([self.key])
            try:
                self.storage.create_exclusive(self.key, self._document())
            except FileExistsError:
                return False
            return True
        finally:
            self.storage.delete([lock])

    def _check_mine(self) -> None:
        data, version = self.storage.read_versioned(self.key)
        doc = self._parse(data)
        if doc is None or doc.get("token") != self.token or (version is not None and self._version not in (None, version)):
            self.held = False
            raise ShardClaimedError(
                f"the writer of input shard {self.shard.source!r} ({self.shard.name}) of {self.storage.url} lost its "
                f"claim: it was not refreshed for {self.timeout_s:.0f} s and another writer took it over"
                + (f" ({self._held_by(doc, self.key)})" if doc else "")
                + "; nothing of this writer is committed, so rerun once that writer has finished")

    def refresh(self, force: bool = False) -> None:
        """Renew the claim (at most every tenth of its timeout unless forced); ShardClaimedError when
        another writer took it over."""
        if not self.held or (not force and time.monotonic() - self._refreshed < self.timeout_s / 10):
            return
        self._check_mine()
        ok, version = self.storage.replace_if(self.key, self._document(), self._version)
        if not ok:
            self.held = False
            raise ShardClaimedError(
                f"the writer of input shard {self.shard.source!r} ({self.shard.name}) of {self.storage.url} lost its "
                f"claim to another writer; nothing of this writer is committed, so rerun once that writer has finished")
        self._version, self._refreshed = version, time.monotonic()

    def check(self) -> None:
        """ShardClaimedError unless this writer still holds the claim (before committing)."""
        if self.held:
            self._check_mine()

    def release(self) -> None:
        """Remove our claim (best effort: a claim left behind is stale once this process is gone)."""
        if not self.held:
            return
        self.held = False
        try:
            data, version = self.storage.read_versioned(self.key)
            doc = self._parse(data)
            if doc is not None and doc.get("token") == self.token:
                self.storage.delete_if(self.key, version)
        except Exception:  # noqa: BLE001 - a read-only or vanished store: the claim goes stale instead
            pass
