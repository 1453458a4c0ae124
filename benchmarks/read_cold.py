"""Cold reads and memory: the shuffled reader over data several times larger than its two
windows, page cache dropped before every pass, beside a cold `preadv` of the very same chunk
files in the very same order with the same threads (same run, interleaved); and the reader's peak
RSS at two dataset sizes, against what its memory budget gives its windows.

    python benchmarks/read_cold.py                       # windows from --memory 384MB; data 4x and 8x them
    python benchmarks/read_cold.py --sizes 3,6 --memory 1GB --json out.json

Cold: every chunk file is evicted with posix_fadvise(DONTNEED) before each pass (with
--drop-caches, as root, `echo 1 > /proc/sys/vm/drop_caches` instead: that drops every process's
cache). Baseline: the reader's own plan order (epoch 0: its windows, flattened), each file read
whole with one preadv into a reused buffer per thread, `--threads` threads. Reader: a fresh
process per pass (so its peak RSS, VmHWM, is its own), timed from the start of iteration to the
last batch, the first window included; `readahead=False` shown beside it. One untimed cold pass
after writing each store lets its write-back settle before the timed passes. RSS: before the reader
(interpreter, torch, the open store) and the peak during the pass; their difference is what the
reader holds, against the two windows its budget sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from read_throughput import LOC, build_store, pread_pass, write_results  # noqa: E402


def status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def drop_cache(files: list[str], system: bool) -> None:
    if system:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # dirty pages (a store just written) are not evicted
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def reader_settings(args) -> dict:
    return dict(batch_size=args.batch_size, threads=args.threads, memory=args.memory, dtype=args.dtype, seed=1)


def plan_files(store, args) -> list[str]:
    """The chunk files in the order the reader's epoch 0 reads them."""
    from activation_store import ShuffledReader
    from activation_store.store.layout import array_key, chunk_key

    reader = ShuffledReader(store, LOC, **reader_settings(args))
    plan = reader.engine.plan(0, reader._epoch_chunks())
    reader.close()
    return [store.storage.path(chunk_key(array_key(LOC), u.index, 3)) for w in plan["windows"] for u in w]


def child(spec: dict) -> dict:
    """One reader pass in this (fresh) process."""
    import torch  # noqa: F401  (imported before the baseline RSS, as a trainer would have it)

    from activation_store import ShuffledReader
    from activation_store.store import open_store

    store = open_store(spec["store"])
    rss_before = status_kb("VmRSS")
    reader = ShuffledReader(store, LOC, readahead=spec["readahead"], **spec["settings"])
    n = 0
    t0 = time.perf_counter()
    for x in reader:
        n += x.shape[0]
    dt = time.perf_counter() - t0
    sizes = reader.memory_plan()
    reader.close()
    return {"tokens": n, "seconds": dt, "tokens_s": n / dt, "rss_before_kb": rss_before, "peak_rss_kb": status_kb("VmHWM"),
            "window_tokens": sizes["window_tokens"], "windows_bytes": 2 * sizes["window_bytes"],
            "budget_bytes": sizes["total_bytes"]}


def run_child(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", default="384MB", help="the reader's memory budget (sizes its windows)")
    ap.add_argument("--sizes", default="4,8", help="dataset sizes, as multiples of the two windows")
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--drop-caches", action="store_true", help="as root: drop the whole page cache instead")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default="benchmarks/results/read_cold.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    from activation_store.readers.config import parse_bytes

    args.memory = parse_bytes(args.memory)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="read_cold_"))
    rows = []
    try:
        for mult in (float(x) for x in args.sizes.split(",")):
            windows_bytes = args.memory  # about what the two windows get
            images = max(16, int(mult * windows_bytes / (257 * args.d_model * 2)) // 16 * 16)
            path = work / f"store-{mult:g}"
            t0 = time.perf_counter()
            store = build_store(path, images, args.d_model, "none")
            print(f"{mult:g}x: wrote {images} images ({store.n_token_rows * args.d_model * 2 / 1e9:.2f} GB) in "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
            files = plan_files(store, args)
            data_bytes = sum(os.path.getsize(f) for f in files)
            spec = {"store": str(path), "settings": reader_settings(args)}
            drop_cache(files, args.drop_caches)
            pread_pass(files, args.threads)  # untimed: lets the write-back of the new store finish first
            r: dict = {"size_x_windows": mult, "images": images, "tokens": store.n_token_rows, "data_bytes": data_bytes,
                       "pread": [], "reader": [], "reader_no_readahead": []}
            for _ in range(args.repeats):
                drop_cache(files, args.drop_caches)
                r["pread"].append({"tokens_s": store.n_token_rows / pread_pass(files, args.threads)[1]})
                drop_cache(files, args.drop_caches)
                r["reader"].append(run_child({**spec, "readahead": True}))
                drop_cache(files, args.drop_caches)
                r["reader_no_readahead"].append(run_child({**spec, "readahead": False}))
                print(f"  pread {r['pread'][-1]['tokens_s']:,.0f} tokens/s, reader {r['reader'][-1]['tokens_s']:,.0f}, "
                      f"without read-ahead {r['reader_no_readahead'][-1]['tokens_s']:,.0f}", flush=True)
            rows.append(r)
            shutil.rmtree(path, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    mb = 1 << 20
    print(f"\n{'data':>9} {'x windows':>9} {'rep':>3} {'cold pread tok/s':>16} {'reader tok/s':>12} {'x pread':>7} "
          f"{'no read-ahead':>13} {'x pread':>7} {'RSS before':>10} {'peak RSS':>9} {'held':>7} {'2 windows':>9}")
    for r in rows:
        for i, p in enumerate(r["pread"]):
            a, b = r["reader"][i], r["reader_no_readahead"][i]
            held = (a["peak_rss_kb"] - a["rss_before_kb"]) * 1024
            print(f"{r['data_bytes'] / 1e9:>7.2f}GB {r['data_bytes'] / a['windows_bytes']:>9.1f} {i + 1:>3} "
                  f"{p['tokens_s']:>16,.0f} {a['tokens_s']:>12,.0f} {a['tokens_s'] / p['tokens_s']:>7.2f} "
                  f"{b['tokens_s']:>13,.0f} {b['tokens_s'] / p['tokens_s']:>7.2f} {a['rss_before_kb'] * 1024 / mb:>8.0f}MB "
                  f"{a['peak_rss_kb'] * 1024 / mb:>7.0f}MB {held / mb:>5.0f}MB {a['windows_bytes'] / mb:>7.0f}MB")
    a = rows[0]["reader"][0]
    print(f"\nmemory budget {args.memory / 1e6:,.0f} MB -> windows of {a['window_tokens']:,} tokens; d {args.d_model}, fp16, "
          f"{args.threads} threads, batch {args.batch_size}, {args.dtype} out; cache dropped with "
          f"{'drop_caches' if args.drop_caches else 'posix_fadvise(DONTNEED) per file'}")
    meta = {"machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(), "load": os.getloadavg()},
            "memory": args.memory, "threads": args.threads, "batch_size": args.batch_size, "dtype": args.dtype,
            "d_model": args.d_model, "drop_caches": args.drop_caches}
    write_results(args.json, meta, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
