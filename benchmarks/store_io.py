"""Write and read speed, and bytes per value, of every codec preset and a few chunk sizes, beside a
raw `pread` of the very same chunk files measured in the same run.

    python benchmarks/store_io.py                 # full grid, ~270 MB per case
    python benchmarks/store_io.py --images 64     # quick look

Speeds are GB/s of *decoded* data (what a trainer receives: 2 bytes per value in fp16/bf16), so a
compressed preset that reads fewer bytes from disk is credited for it. Reads use a pool of
threads, each fetching one whole chunk per call, in store order ("sequential") or in a random
chunk order ("random"), exactly as the raw pread baseline does. "warm" = the files are in the page
cache (just written); "cold" = evicted with posix_fadvise(DONTNEED) before the pass.
"""

from __future__ import annotations

import argparse
import importlib.util
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

from activation_store.store import ActivationStore, ImageRecord, StoreConfig
from activation_store.store.encoding import physical_dtype, to_storage
from activation_store.store.layout import chunk_key
from activation_store.synthetic import synthetic_activations

LOC = "resid_22"


# zarrs (the Rust codec pipeline) is an optional extra: pip install -e ".[bench]"
FAST_PIPELINE = "zarrs" if importlib.util.find_spec("zarrs") else "default"


def configure(pipeline: str) -> None:
    """zarr's codec pipeline for the zarr-API column: 'zarrs' (Rust) or 'default'."""
    import zarr

    path = "zarrs.ZarrsCodecPipeline" if pipeline == "zarrs" else "zarr.core.codec_pipeline.BatchedCodecPipeline"
    zarr.config.set({"codec_pipeline.path": path, "threading.max_workers": len(os.sched_getaffinity(0))})


def make_data(n_images: int, n_tokens: int, d_model: int) -> np.ndarray:
    parts = [synthetic_activations(i, min(16, n_images - i), n_tokens, d_model, np.float16)
             for i in range(0, n_images, 16)]
    return np.concatenate(parts)


def evict(paths: list[str]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_pool(fn, items, threads: int) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(fn, items):
            pass
    return time.perf_counter() - t0


def run_case(workdir: Path, data_fp16: np.ndarray, dtype: str, preset: str, chunk_images: int, pipeline: str,
             threads: int, repeats: int, rng: np.random.Generator) -> dict:
    configure(pipeline)
    n, t, d = data_fp16.shape
    region = -(-n // chunk_images) * chunk_images
    path = workdir / f"{dtype}-{preset}-{chunk_images}-{pipeline}"
    shutil.rmtree(path, ignore_errors=True)
    store = ActivationStore.create(str(path), locations=[LOC], n_tokens=t, d_model=d,
                                   config=StoreConfig(dtype=dtype, codec=preset, chunk_images=chunk_images,
                                                      region_images=region))
    store.plan_shards([("bench", n)])
    data = to_storage(data_fp16.astype(np.float32), dtype) if dtype != "fp16" else data_fp16
    decoded_bytes = n * t * d * physical_dtype(dtype).itemsize
    records = [ImageRecord(key=str(i)) for i in range(n)]

    # write (statistics off: in a harvest they are computed on the GPU)
    t0 = time.perf_counter()
    w = store.writer("bench", compute_stats=False)
    for i in range(0, n, chunk_images):
        w.add({LOC: data[i:i + chunk_images]}, records[i:i + chunk_images])
    w.commit()
    write_s = time.perf_counter() - t0

    store = ActivationStore.open(str(path))
    arr = store.array(LOC)
    n_chunks = -(-n // chunk_images)
    files = [str(path / chunk_key(LOC, c, 3)) for c in range(n_chunks)]
    disk_bytes = sum(os.path.getsize(f) for f in files)
    max_file = max(os.path.getsize(f) for f in files)
    seq = list(range(n_chunks))
    rnd = list(rng.permutation(n_chunks))

    def read_chunk(c: int) -> None:  # zarr's own API: a fresh array per call
        a = arr[c * chunk_images:(c + 1) * chunk_images]
        assert a.shape[0] > 0

    outs: dict[int, np.ndarray] = {}

    def fetch_chunk(c: int) -> None:  # our chunk path: per-thread buffer, decode off the GIL
        out = outs.get(threading.get_ident())
        if out is None:
            out = outs[threading.get_ident()] = np.empty((chunk_images, t, d), physical_dtype(dtype))
        store.fetch_chunk_into(LOC, c, out)

    bufs: dict[int, bytearray] = {}

    def pread_chunk(c: int) -> None:
        tid = threading.get_ident()
        buf = bufs.get(tid)
        if buf is None:
            buf = bufs[tid] = bytearray(max_file)
        fd = os.open(files[c], os.O_RDONLY)
        try:
            os.preadv(fd, [memoryview(buf)], 0)
        finally:
            os.close(fd)

    def best(fn, order, cold: bool) -> float:
        times = []
        for _ in range(repeats):
            if cold:
                evict(files)
            times.append(timed_pool(fn, order, threads))
        return min(times)

    read_chunk(0)  # open the codec pipeline once
    fetch_chunk(0)
    res = {
        "dtype": dtype, "preset": preset, "chunk_images": chunk_images, "pipeline": pipeline,
        "chunk_mb": chunk_images * t * d * physical_dtype(dtype).itemsize / 1e6,
        "bytes_per_value": disk_bytes / (n * t * d),
        "ratio": decoded_bytes / disk_bytes,
        "write_gbps": decoded_bytes / write_s / 1e9,
    }
    for temp in ("warm", "cold"):
        cold = temp == "cold"
        for name, order in (("seq", seq), ("rand", rnd)):
            fs = best(fetch_chunk, order, cold)
            zs = best(read_chunk, order, cold)
            ps = best(pread_chunk, order, cold)
            res[f"read_{name}_{temp}_gbps"] = decoded_bytes / fs / 1e9
            res[f"zarr_{name}_{temp}_gbps"] = decoded_bytes / zs / 1e9
            res[f"pread_{name}_{temp}_gbps"] = disk_bytes / ps / 1e9
            # the pread ceiling, counted in decoded bytes delivered per second
            res[f"ceiling_{name}_{temp}_gbps"] = decoded_bytes / ps / 1e9
            res[f"vs_pread_{name}_{temp}"] = ps / fs
            res[f"zarr_vs_pread_{name}_{temp}"] = ps / zs
    store_lossy = store.lossy_error(LOC)
    if store_lossy:
        res["lossy_max_rel"] = store_lossy["max_rel"]
        res["lossy_relative_rmse"] = store_lossy["relative_rmse"]
    shutil.rmtree(path, ignore_errors=True)
    return res


def default_grid() -> list[tuple[str, str, int, str]]:
    grid = []
    for preset in ("none", "zstd", "shuffle-zstd", "bitround-shuffle-zstd"):
        grid.append(("fp16", preset, 16, FAST_PIPELINE))
    for chunk in (4, 64):
        for preset in ("none", "shuffle-zstd"):
            grid.append(("fp16", preset, chunk, FAST_PIPELINE))
    grid += [("bf16", "shuffle-zstd", 16, FAST_PIPELINE), ("bf16", "none", 16, FAST_PIPELINE),
             ("fp32", "none", 16, FAST_PIPELINE)]
    grid += [("fp16", "none", 16, "default"), ("fp16", "shuffle-zstd", 16, "default")]
    return list(dict.fromkeys(grid))  # without zarrs the last two rows are already in the grid


def print_table(rows: list[dict]) -> None:
    head = (f"{'dtype':<5} {'preset':<22} {'chunk':>5} {'MB':>5} {'pipeline':<8} {'B/val':>6} {'ratio':>5} "
            f"{'write':>6} {'seq warm':>8} {'rnd warm':>8} {'pread':>6} {'x pread':>7} {'zarr':>5} {'rnd cold':>8} {'pread':>6} {'x pread':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['dtype']:<5} {r['preset']:<22} {r['chunk_images']:>5} {r['chunk_mb']:>5.1f} {r['pipeline']:<8} "
              f"{r['bytes_per_value']:>6.3f} {r['ratio']:>5.2f} {r['write_gbps']:>6.2f} {r['read_seq_warm_gbps']:>8.2f} "
              f"{r['read_rand_warm_gbps']:>8.2f} {r['ceiling_rand_warm_gbps']:>6.2f} {r['vs_pread_rand_warm']:>7.2f} "
              f"{r['zarr_vs_pread_rand_warm']:>5.2f} "
              f"{r['read_rand_cold_gbps']:>8.2f} {r['ceiling_rand_cold_gbps']:>6.2f} {r['vs_pread_rand_cold']:>7.2f}")
    print("\nGB/s of decoded data. 'seq'/'rnd' = our chunk path (store.fetch_chunk_into) in store / random chunk order;"
          " 'pread' = raw pread of the same chunk files in the same order and thread pool, counted in decoded bytes;"
          " 'x pread' = our read speed / pread speed; 'zarr' = the same ratio for zarr's own array API.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512, help="images per case (257 tokens each)")
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=4, help="chunk reads in flight")
    ap.add_argument("--repeats", type=int, default=2, help="passes per measurement; the best is kept")
    ap.add_argument("--workdir", default=None, help="where to write the stores (default: a temp dir on /tmp)")
    ap.add_argument("--out", default="benchmarks/results/store_io.json")
    args = ap.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="store_io_"))
    workdir.mkdir(parents=True, exist_ok=True)
    data = make_data(args.images, 257, args.d_model)
    rng = np.random.default_rng(0)
    rows = []
    try:
        # warm-up: first-use imports and codec initialisation must not count against the first case
        run_case(workdir, data[:16], "fp16", "shuffle-zstd", 16, FAST_PIPELINE, 1, 1, np.random.default_rng(0))
        for dtype, preset, chunk, pipeline in default_grid():
            r = run_case(workdir, data, dtype, preset, chunk, pipeline, args.threads, args.repeats, rng)
            rows.append(r)
            print(f"  {dtype} {preset} chunk {chunk} {pipeline}: done", file=sys.stderr)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(rows)
    meta = {
        "machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                    "processor": platform.processor(), "python": platform.python_version()},
        "images": args.images, "d_model": args.d_model, "tokens": 257, "threads": args.threads,
        "repeats": args.repeats, "data": "synthetic ViT-like activations (activation_store.synthetic)",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
