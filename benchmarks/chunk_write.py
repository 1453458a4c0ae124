"""Writing chunk objects to a local file system: the writer's way (`Storage.write_chunk` of a
`FramedPayload`: each 1 MiB piece checksummed just before it is written) beside the way before it
(the whole payload checksummed, then payload and checksum written with one `writev`), and a plain
`pwrite` of the payload alone with no checksum (the ceiling), all in the same run, interleaved.

    python benchmarks/chunk_write.py                          # /tmp's file system and /dev/shm
    python benchmarks/chunk_write.py --out-dir /mnt/nvme/x    # any file system

Each pass writes `--chunks` chunk files of `--chunk-mb` MB from `--threads` threads, the bytes taken
chunk after chunk from memory far larger than the CPU's caches (as a harvest's come from its host
slots). GB/s of payload; CPU s/GB of the whole process (time.process_time). The page cache is
synced before every pass; no fsync (the store's writer does not fsync chunks).
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

from activation_store.store.chunk_io import ChunkCodec, FramedPayload
from activation_store.store.storage import Storage

CODEC = ChunkCodec([{"name": "bytes"}, {"name": "crc32c"}])


def _plain(storage: Storage, key: str, payload: np.ndarray) -> None:
    fd = os.open(storage.path(key), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, payload, 0)
    finally:
        os.close(fd)


WAYS = {
    "pwrite, no checksum (ceiling)": _plain,
    "checksum, then writev": lambda storage, key, payload: storage.write_chunk(key, FramedPayload(payload).parts()),
    "checksum piece by piece (the writer's)": lambda storage, key, payload: storage.write_chunk(key, FramedPayload(payload)),
}


def one_pass(base: Path, way, source: np.ndarray, chunk_bytes: int, chunks: int, threads: int) -> dict:
    target = base / "chunk-write"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    storage = Storage(str(target))
    per_source = source.nbytes // chunk_bytes
    lock, nxt = threading.Lock(), [0]

    def worker() -> None:
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= chunks:
                return
            start = (i % per_source) * chunk_bytes
            way(storage, f"c{i}", source[start:start + chunk_bytes])

    os.sync()
    t0, c0 = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(worker) for _ in range(threads)]:
            f.result()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    shutil.rmtree(target)
    gb = chunks * chunk_bytes / 1e9
    return {"gb_per_s": gb / dt, "cpu_s_per_gb": cpu / gb}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk-mb", type=float, default=16 * 257 * 1024 * 2 / 1e6,
                    help="payload per chunk file (default: 16 images x 257 x 1024 fp16, 8.4 MB)")
    ap.add_argument("--chunks", type=int, default=200)
    ap.add_argument("--threads", type=int, default=4, help="writing threads (the harvest's: 2 per core, <= layers)")
    ap.add_argument("--source-mb", type=int, default=540, help="memory the chunks are taken from")
    ap.add_argument("--repeats", type=int, default=4, help="interleaved passes per way (median kept)")
    ap.add_argument("--out-dir", action="append", default=None)
    ap.add_argument("--json", default="benchmarks/results/chunk_write.json")
    args = ap.parse_args(argv)
    chunk_bytes = int(args.chunk_mb * 1e6)
    source = np.random.default_rng(1).integers(0, 255, max(args.source_mb * 10**6, chunk_bytes), dtype=np.uint8)
    made = []
    if args.out_dir:
        targets = [Path(d) for d in args.out_dir]
    else:
        targets = [Path(tempfile.mkdtemp(prefix="chunk-write-"))]
        if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 4 * chunk_bytes * args.chunks:
            targets.append(Path(tempfile.mkdtemp(prefix="chunk-write-", dir="/dev/shm")))
        made = list(targets)
    rows = []
    try:
        for base in targets:
            runs: dict[str, list[dict]] = {name: [] for name in WAYS}
            for _ in range(args.repeats):
                for name, way in WAYS.items():
                    runs[name].append(one_pass(base, way, source, chunk_bytes, args.chunks, args.threads))
            ceiling = float(np.median([r["gb_per_s"] for r in runs[next(iter(WAYS))]]))
            before = float(np.median([r["gb_per_s"] for r in runs["checksum, then writev"]]))
            for name, rs in runs.items():
                gbs = float(np.median([r["gb_per_s"] for r in rs]))
                rows.append({"out_dir": str(base), "way": name, "gb_per_s": gbs,
                             "cpu_s_per_gb": float(np.median([r["cpu_s_per_gb"] for r in rs])),
                             "x_ceiling": gbs / ceiling, "x_checksum_then_writev": gbs / before,
                             "passes_gb_per_s": [r["gb_per_s"] for r in rs]})
    finally:
        for t in made:
            shutil.rmtree(t, ignore_errors=True)
    print(f"{args.chunks} chunks of {chunk_bytes / 1e6:.1f} MB, {args.threads} threads, from {source.nbytes / 1e6:.0f} MB; "
          f"median of {args.repeats} interleaved passes")
    print(f"{'file system':24s} {'way':40s} {'GB/s':>6s} {'CPU s/GB':>8s} {'x ceiling':>9s} {'x before':>8s}")
    for r in rows:
        print(f"{r['out_dir'][:24]:24s} {r['way']:40s} {r['gb_per_s']:6.2f} {r['cpu_s_per_gb']:8.2f} "
              f"{r['x_ceiling']:9.2f} {r['x_checksum_then_writev']:8.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                                                        "load": os.getloadavg(), "chunk_bytes": chunk_bytes,
                                                        "chunks": args.chunks, "threads": args.threads},
                                               "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
