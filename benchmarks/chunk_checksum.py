"""Chunk objects on a local file system, checksummed the store's way (a 1 MiB piece at a time,
right beside the copy that moves the piece, so the piece is read from the core's cache the second
time) beside the way before it (the whole payload checksummed in a pass of its own) and beside
the copy alone with no checksum (the ceiling), all in the same run, interleaved:

- writes: `Storage.write_chunk` of a `FramedPayload` / checksum then one `writev` / plain `pwrite`;
- reads into a window, of the chunk files just written (warm): the reader's one `preadv` then the
  checksum (`ChunkCodec.pread_uncompressed`) / a `preadv` and a checksum per piece (tried: no
  faster, not kept) / plain `preadv`;
- copies out of a GET's buffer (object stores): `ChunkCodec.decode_into` / checksum then copy /
  copy alone.

    python benchmarks/chunk_checksum.py                          # /tmp's file system and /dev/shm
    python benchmarks/chunk_checksum.py --out-dir /mnt/nvme/x    # any file system

Each pass moves `--chunks` chunks of `--chunk-mb` MB with `--threads` threads, from and into
memory far larger than the CPU's caches (as a harvest's host slots and a reader's windows are).
GB/s of payload; CPU s/GB of the whole process (time.process_time); "x 2nd": against the second
way of its kind. The page cache is synced
before every write pass; no fsync (the store's writer does not fsync chunks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from crc32c import crc32c

from activation_store.store.chunk_io import CRC_BYTES, PIECE, ChunkCodec, FramedPayload
from activation_store.store.storage import Storage

CODEC = ChunkCodec([{"name": "bytes"}, {"name": "crc32c"}])


def _plain(storage: Storage, key: str, payload: np.ndarray) -> None:
    fd = os.open(storage.path(key), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, payload, 0)
    finally:
        os.close(fd)


def _checksum_then_writev(storage: Storage, key: str, payload: np.ndarray) -> None:
    """The store's writes before FramedPayload: the whole payload checksummed, then one writev."""
    fd = os.open(storage.path(key), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.writev(fd, FramedPayload(payload).parts())
    finally:
        os.close(fd)


WAYS = {
    "pwrite, no checksum (ceiling)": _plain,
    "checksum, then writev": _checksum_then_writev,
    "checksum piece by piece (the writer's)": lambda storage, key, payload: storage.write_chunk(key, FramedPayload(payload)),
}


def _pread_plain(path: str, out: np.ndarray) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, [out, bytearray(CRC_BYTES)], 0)
    finally:
        os.close(fd)


def _pread_piecewise(path: str, out: np.ndarray) -> None:
    """A preadv and a checksum per PIECE (tried for the readers; measured no faster, not kept)."""
    crc, stored = 0, bytearray(CRC_BYTES)
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in range(0, out.nbytes, PIECE):
            piece = out[off:off + PIECE]
            os.preadv(fd, [piece], off)
            crc = crc32c(piece, crc)
        os.preadv(fd, [stored], out.nbytes)
    finally:
        os.close(fd)
    if crc.to_bytes(CRC_BYTES, "little") != bytes(stored):
        raise SystemExit(f"{path}: checksum mismatch")


READS = {
    "preadv, no checksum (ceiling)": _pread_plain,
    "preadv, then checksum (the reader's)": lambda path, out: CODEC.pread_uncompressed(path, out, path),
    "preadv and checksum piece by piece (tried)": _pread_piecewise,
}


def _copy_then_checksum(data: np.ndarray, out: np.ndarray) -> None:
    if crc32c(data[:-CRC_BYTES]).to_bytes(CRC_BYTES, "little") != bytes(data[-CRC_BYTES:]):
        raise SystemExit("checksum mismatch")
    out[:] = data[:-CRC_BYTES]


COPIES = {
    "copy, no checksum (ceiling)": lambda data, out: out.__setitem__(slice(None), data[:-CRC_BYTES]),
    "checksum, then copy": _copy_then_checksum,
    "checksum and copy piece by piece (the reader's)": lambda data, out: CODEC.decode_into(data, out, "chunk"),
}


def _threads(n: int, threads: int, fn) -> float:
    """Seconds for fn(i), i < n, by `threads` threads taking the next i."""
    lock, nxt = threading.Lock(), [0]

    def worker() -> None:
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= n:
                return
            fn(i)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(worker) for _ in range(threads)]:
            f.result()
    return time.perf_counter() - t0


def read_passes(base: Path, source: np.ndarray, chunk_bytes: int, chunks: int, threads: int, repeats: int) -> dict:
    """{way: [(GB/s, CPU s/GB)]} of the read ways over `chunks` chunk files written once (warm), and
    of the copy ways out of in-memory objects, into a destination as large as `source`."""
    target = base / "chunk-read"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    storage = Storage(str(target))
    per_source = source.nbytes // chunk_bytes
    for i in range(chunks):
        storage.write_chunk(f"c{i}", FramedPayload(source[(i % per_source) * chunk_bytes:(i % per_source + 1) * chunk_bytes]))
    dest = np.empty_like(source)
    dest[:] = 1  # every page touched before timing
    objects = [np.frombuffer(b"".join(bytes(p) for p in FramedPayload(source[j * chunk_bytes:(j + 1) * chunk_bytes]).parts()),
                             np.uint8) for j in range(min(per_source, 32))]
    out = {name: [] for name in [*READS, *COPIES]}
    gb = chunks * chunk_bytes / 1e9
    try:
        for _ in range(repeats):
            for name, way in READS.items():
                c0 = time.process_time()
                dt = _threads(chunks, threads, lambda i, way=way: way(
                    str(target / f"c{i}"), dest[(i % per_source) * chunk_bytes:(i % per_source + 1) * chunk_bytes]))
                out[name].append({"gb_per_s": gb / dt, "cpu_s_per_gb": (time.process_time() - c0) / gb})
            for name, way in COPIES.items():
                c0 = time.process_time()
                dt = _threads(chunks, threads, lambda i, way=way: way(
                    objects[i % len(objects)], dest[(i % per_source) * chunk_bytes:(i % per_source + 1) * chunk_bytes]))
                out[name].append({"gb_per_s": gb / dt, "cpu_s_per_gb": (time.process_time() - c0) / gb})
    finally:
        shutil.rmtree(target, ignore_errors=True)
    return out


def write_pass(base: Path, way, source: np.ndarray, chunk_bytes: int, chunks: int, threads: int) -> dict:
    target = base / "chunk-write"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    storage = Storage(str(target))
    per_source = source.nbytes // chunk_bytes
    os.sync()
    c0 = time.process_time()
    dt = _threads(chunks, threads, lambda i: way(storage, f"c{i}", source[(i % per_source) * chunk_bytes:
                                                                         (i % per_source + 1) * chunk_bytes]))
    cpu = time.process_time() - c0
    shutil.rmtree(target)
    gb = chunks * chunk_bytes / 1e9
    return {"gb_per_s": gb / dt, "cpu_s_per_gb": cpu / gb}


def summarise(base: Path, kind: str, runs: dict[str, list[dict]]) -> list[dict]:
    """Rows of one kind (write, read, copy): medians, against the ceiling (its first way) and its
    second way (writes and copies: the way before; reads: the reader's)."""
    names = list(runs)
    med = {n: float(np.median([r["gb_per_s"] for r in runs[n]])) for n in names}
    return [{"out_dir": str(base), "kind": kind, "way": n, "gb_per_s": med[n],
             "cpu_s_per_gb": float(np.median([r["cpu_s_per_gb"] for r in runs[n]])),
             "x_ceiling": med[n] / med[names[0]], "x_second": med[n] / med[names[1]],
             "passes_gb_per_s": [r["gb_per_s"] for r in runs[n]]} for n in names]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk-mb", type=float, default=16 * 257 * 1024 * 2 / 1e6,
                    help="payload per chunk file (default: 16 images x 257 x 1024 fp16, 8.4 MB)")
    ap.add_argument("--chunks", type=int, default=200)
    ap.add_argument("--threads", type=int, default=4, help="threads (the harvest's writer and the readers': 4 here)")
    ap.add_argument("--source-mb", type=int, default=540, help="memory the chunks are taken from and read into")
    ap.add_argument("--repeats", type=int, default=4, help="interleaved passes per way (median kept)")
    ap.add_argument("--out-dir", action="append", default=None)
    ap.add_argument("--json", default="benchmarks/results/chunk_checksum.json")
    args = ap.parse_args(argv)
    chunk_bytes = int(args.chunk_mb * 1e6)
    source = np.random.default_rng(1).integers(0, 255, max(args.source_mb * 10**6, chunk_bytes), dtype=np.uint8)
    made = []
    if args.out_dir:
        targets = [Path(d) for d in args.out_dir]
    else:
        targets = [Path(tempfile.mkdtemp(prefix="chunk-checksum-"))]
        if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 4 * chunk_bytes * args.chunks:
            targets.append(Path(tempfile.mkdtemp(prefix="chunk-checksum-", dir="/dev/shm")))
        made = list(targets)
    rows = []
    try:
        for base in targets:
            writes: dict[str, list[dict]] = {name: [] for name in WAYS}
            for _ in range(args.repeats):
                for name, way in WAYS.items():
                    writes[name].append(write_pass(base, way, source, chunk_bytes, args.chunks, args.threads))
            rows += summarise(base, "write", writes)
            reads = read_passes(base, source, chunk_bytes, args.chunks, args.threads, args.repeats)
            rows += summarise(base, "read", {n: reads[n] for n in READS})
            if base == targets[0]:  # copies out of memory do not depend on the file system
                rows += summarise(base, "copy", {n: reads[n] for n in COPIES})
    finally:
        for t in made:
            shutil.rmtree(t, ignore_errors=True)
    print(f"{args.chunks} chunks of {chunk_bytes / 1e6:.1f} MB, {args.threads} threads, from {source.nbytes / 1e6:.0f} MB; "
          f"median of {args.repeats} interleaved passes")
    print(f"{'file system':24s} {'way':50s} {'GB/s':>6s} {'CPU s/GB':>8s} {'x ceiling':>9s} {'x 2nd':>6s}")
    for r in rows:
        print(f"{r['out_dir'][:24]:24s} {r['way']:50s} {r['gb_per_s']:6.2f} {r['cpu_s_per_gb']:8.2f} "
              f"{r['x_ceiling']:9.2f} {r['x_second']:6.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                                                        "load": os.getloadavg(), "chunk_bytes": chunk_bytes,
                                                        "chunks": args.chunks, "threads": args.threads},
                                               "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
