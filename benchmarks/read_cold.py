"""Cold reads and memory: the shuffled reader over data several times larger than its two
windows, page cache dropped before every pass, beside a cold `preadv` of the very same chunk
files in the very same order with the same threads (same run, interleaved); and the reader's peak
RSS at two dataset sizes, against what its memory budget gives its windows.

    python benchmarks/read_cold.py                       # windows from --memory 384MB; data 4x and 8x them
    python benchmarks/read_cold.py --sizes 3,6 --memory 1GB --json out.json
    python benchmarks/read_cold.py --store-dtypes fp16,fp8 --dtype float16,float32 --drop-caches
        # also the fp8 conversion of each store (`actstore convert`: the same images), its passes
        # interleaved with the fp16 store's; prints fp8 / fp16 tokens/s per output dtype

fp8: the pread baseline reads each chunk's code file and its scale file, as the reader does.

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

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from read_throughput import LOC, build_store, bytes_per_value, converted_store, pread_pass, write_results  # noqa: E402


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


def reader_settings(args, dtype: str | None = None) -> dict:
    return dict(batch_size=args.batch_size, threads=args.threads, memory=args.memory,
                dtype=dtype or args.dtype.split(",")[0], seed=1)


def plan_files(store, args) -> list[str]:
    """The chunk files in the order the reader's epoch 0 reads them (fp8: each code file followed by
    its scale file, as the reader fetches both)."""
    from activation_store import ShuffledReader
    from activation_store.store.layout import array_key, chunk_key, scale_array_key

    reader = ShuffledReader(store, LOC, **reader_settings(args))
    plan = reader.engine.plan(0, reader._epoch_chunks())
    reader.close()
    files = []
    for w in plan["windows"]:
        for u in w:
            files.append(store.storage.path(chunk_key(array_key(LOC), u.index, 3)))
            if store.quantized:
                files.append(store.storage.path(chunk_key(scale_array_key(array_key(LOC)), u.index, 2)))
    return files


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
    ap.add_argument("--dtype", default="float16", help="the readers' output dtype, or several: float16,float32")
    ap.add_argument("--store-dtypes", default="fp16",
                    help="storage dtypes, e.g. fp16,fp8: the fp16 store is written, the others converted from it")
    ap.add_argument("--no-readahead-pass", default=True, action=argparse.BooleanOptionalAction,
                    help="also a pass with readahead=False")
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
    dtypes, out_dtypes = args.store_dtypes.split(","), args.dtype.split(",")
    if dtypes[0] != "fp16":
        ap.error("--store-dtypes must start with fp16 (the store written; the others are converted from it)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="read_cold_"))
    rows = []
    load = {"before": os.getloadavg()}
    try:
        for mult in (float(x) for x in args.sizes.split(",")):
            windows_bytes = args.memory  # about what the two windows get
            images = max(16, int(mult * windows_bytes / (257 * args.d_model * 2)) // 16 * 16)
            path = work / f"store-{mult:g}"
            t0 = time.perf_counter()
            store = build_store(path, images, args.d_model, "none")
            print(f"{mult:g}x: wrote {images} images ({store.n_token_rows * args.d_model * 2 / 1e9:.2f} GB) in "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
            stores = {"fp16": (path, store)}
            for dt in dtypes[1:]:
                t0 = time.perf_counter()
                stores[dt] = (work / f"store-{mult:g}-{dt}", converted_store(store, work / f"store-{mult:g}-{dt}", dt))
                print(f"  converted to {dt} in {time.perf_counter() - t0:.0f}s", flush=True)
            group = {}
            for dt, (p, st) in stores.items():
                files = plan_files(st, args)
                group[dt] = {"files": files, "spec": {"store": str(p)}, "row": {
                    "size_x_windows": mult, "store_dtype": dt, "images": images, "tokens": st.n_token_rows,
                    "data_bytes": sum(os.path.getsize(f) for f in files), "bytes_per_value": bytes_per_value(st),
                    "pread": [], "reader": [], "reader_no_readahead": []}}
                drop_cache(files, args.drop_caches)
                pread_pass(files, args.threads)  # untimed: lets the write-back of the new store finish first
            for _ in range(args.repeats):
                for dt, g in group.items():  # fp16, fp8, fp16, fp8, ...: interleaved
                    r, files = g["row"], g["files"]
                    drop_cache(files, args.drop_caches)
                    r["pread"].append({"tokens_s": r["tokens"] / pread_pass(files, args.threads)[1],
                                       "load": os.getloadavg()[0]})
                    for od in out_dtypes:
                        spec = {**g["spec"], "settings": reader_settings(args, od)}
                        drop_cache(files, args.drop_caches)
                        r["reader"].append({**run_child({**spec, "readahead": True}), "out_dtype": od,
                                            "load": os.getloadavg()[0]})
                        if args.no_readahead_pass:
                            drop_cache(files, args.drop_caches)
                            r["reader_no_readahead"].append({**run_child({**spec, "readahead": False}), "out_dtype": od})
                        nra = (f", without read-ahead {r['reader_no_readahead'][-1]['tokens_s']:,.0f}"
                               if args.no_readahead_pass else "")
                        print(f"  {dt} {od} out: pread {r['pread'][-1]['tokens_s']:,.0f} tokens/s, reader "
                              f"{r['reader'][-1]['tokens_s']:,.0f}{nra}  (load {os.getloadavg()[0]:.2f})", flush=True)
            for dt, g in group.items():
                rows.append(g["row"])
                shutil.rmtree(stores[dt][0], ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    load["after"] = os.getloadavg()

    mb = 1 << 20
    print(f"\n{'data':>9} {'dtype':>5} {'out':>7} {'x windows':>9} {'rep':>3} {'cold pread tok/s':>16} {'reader tok/s':>12} "
          f"{'x pread':>7} {'no read-ahead':>13} {'x pread':>7} {'RSS before':>10} {'peak RSS':>9} {'held':>7} {'2 windows':>9}")
    for r in rows:
        for i, a in enumerate(r["reader"]):
            p = r["pread"][i // len(out_dtypes)]
            b = r["reader_no_readahead"][i] if r["reader_no_readahead"] else None
            held = (a["peak_rss_kb"] - a["rss_before_kb"]) * 1024
            nra = (f"{b['tokens_s']:>13,.0f} {b['tokens_s'] / p['tokens_s']:>7.2f}" if b else f"{'-':>13} {'-':>7}")
            print(f"{r['data_bytes'] / 1e9:>7.2f}GB {r['store_dtype']:>5} {a['out_dtype']:>7} "
                  f"{r['data_bytes'] / a['windows_bytes']:>9.1f} {i // len(out_dtypes) + 1:>3} "
                  f"{p['tokens_s']:>16,.0f} {a['tokens_s']:>12,.0f} {a['tokens_s'] / p['tokens_s']:>7.2f} "
                  f"{nra} {a['rss_before_kb'] * 1024 / mb:>8.0f}MB "
                  f"{a['peak_rss_kb'] * 1024 / mb:>7.0f}MB {held / mb:>5.0f}MB {a['windows_bytes'] / mb:>7.0f}MB")
    ratios = []
    by = {(r["size_x_windows"], r["store_dtype"]): r for r in rows}
    for (mult, dt), r in by.items():
        print(f"{mult:g}x {dt}: bytes/value {r['bytes_per_value']['all_objects']:.4f} (every object of the data"
              f"{' and scale' if dt == 'fp8' else ''} arrays; info {r['bytes_per_value']['info']:.4f})")
        if dt == "fp16":
            continue
        f16 = by[(mult, "fp16")]
        for od in out_dtypes:
            mine = [a["tokens_s"] for a in r["reader"] if a["out_dtype"] == od]
            base = [a["tokens_s"] for a in f16["reader"] if a["out_dtype"] == od]
            per_pass = [a / b for a, b in zip(mine, base)]
            q = {"size_x_windows": mult, "store_dtype": dt, "out_dtype": od, "reader_over_fp16_store_median":
                 float(np.median(mine) / np.median(base)), "per_pass": per_pass}
            ratios.append(q)
            print(f"{mult:g}x {dt} / fp16, {od} out: reader tokens/s x{q['reader_over_fp16_store_median']:.2f} "
                  f"(per interleaved pass: {', '.join(f'{v:.2f}' for v in per_pass)})")
        pr = [a["tokens_s"] / b["tokens_s"] for a, b in zip(r["pread"], f16["pread"])]
        print(f"{mult:g}x {dt} / fp16: cold pread tokens/s per pass {', '.join(f'{v:.2f}' for v in pr)}")
    a = rows[0]["reader"][0]
    print(f"\nmemory budget {args.memory / 1e6:,.0f} MB -> windows of {a['window_tokens']:,} tokens ({rows[0]['store_dtype']});"
          f" d {args.d_model}, {args.threads} threads, batch {args.batch_size}, {args.dtype} out; cache dropped with "
          f"{'drop_caches' if args.drop_caches else 'posix_fadvise(DONTNEED) per file'}; load average "
          f"{load['before'][0]:.2f} before, {load['after'][0]:.2f} after")
    meta = {"machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(), "load": os.getloadavg(),
                        "load_before_after": load},
            "memory": args.memory, "threads": args.threads, "batch_size": args.batch_size, "dtype": args.dtype,
            "store_dtypes": dtypes, "d_model": args.d_model, "drop_caches": args.drop_caches}
    results = rows if len(dtypes) == 1 else {"rows": rows, "store_dtype_ratios": ratios}
    write_results(args.json, meta, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
