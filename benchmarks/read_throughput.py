"""Reader throughput: tokens/s and GB/s of the shuffled, ordered and CLS-only readers per codec
preset, beside (a) a raw pread of the same chunk files (the ceiling), (b) the codec's standalone
decode rate (compressed presets), and (c) a saev-style baseline (flat fp32 memmap, batches
gathered one row at a time), all on the same data in the same run.

    python benchmarks/read_throughput.py                  # 1,024 images x 257 tokens x 1024 (0.54 GB fp16)
    python benchmarks/read_throughput.py --device cuda    # also: tokens/s delivered into GPU memory
    python benchmarks/read_throughput.py --json out.json  # where the JSON goes

"float32 out / fp16 out" is the float32 reader's rate over the fp16-out reader's, same run, same
cache state (the conversion's cost: float32 batches are twice the bytes).

Page cache: "warm" passes run right after a full read of the same files; "cold" passes evict them
first with posix_fadvise(DONTNEED). GB/s count decoded fp16 bytes (2 per value) delivered.
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
import torch

from activation_store import OrderedReader, ShuffledReader
from activation_store.store import ActivationStore, ImageRecord, StoreConfig, open_store
from activation_store.store.layout import array_key, chunk_key
from activation_store.synthetic import synthetic_activations

LOC = "resid_22"


def build_store(path: Path, n_images: int, d: int, codec: str, stats: bool = False) -> ActivationStore:
    shutil.rmtree(path, ignore_errors=True)
    store = ActivationStore.create(str(path), locations=[LOC], n_tokens=257, d_model=d,
                                   config=StoreConfig(codec=codec, chunk_images=16, region_images=256))
    per_shard = 256
    store.plan_shards([(f"s{i}", min(per_shard, n_images - i * per_shard)) for i in range(-(-n_images // per_shard))])
    for i in range(-(-n_images // per_shard)):
        n = min(per_shard, n_images - i * per_shard)
        with store.writer(f"s{i}", compute_stats=stats) as w:
            for j in range(0, n, 16):
                k = min(16, n - j)
                w.add({LOC: synthetic_activations(i * 1000 + j, k, 257, d, np.float16)},
                      [ImageRecord(f"{i}-{j + t}") for t in range(k)])
    return open_store(str(path))


def chunk_files(store: ActivationStore) -> list[str]:
    return [store.storage.path(chunk_key(array_key(LOC), c.index, 3)) for c in store.chunk_refs(LOC)]


def evict(files: list[str]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.fdatasync(fd)  # dirty pages (a store just written) are not evicted
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def warm(files: list[str]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def pread_pass(files: list[str], threads: int) -> tuple[int, float]:
    """(bytes, seconds) of reading every file whole, in the given order, `threads` at a time, with
    one reused buffer per thread: the raw baseline of the reader benchmarks."""
    size = max(os.path.getsize(f) for f in files)
    bufs: dict[int, bytearray] = {}

    def read(f: str) -> int:
        buf = bufs.setdefault(threading.get_ident(), bytearray(size))
        fd = os.open(f, os.O_RDONLY)
        try:
            return os.preadv(fd, [buf], 0)
        finally:
            os.close(fd)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(read, files))
    return total, time.perf_counter() - t0


def pread_rate(files: list[str], threads: int, rng) -> float:
    """Bytes/s of reading every chunk file whole, in a random order, into reused buffers."""
    total, seconds = pread_pass([files[i] for i in rng.permutation(len(files))], threads)
    return total / seconds


def write_results(path: str | None, meta: dict, rows: list) -> None:
    """The benchmark's JSON: {"meta": ..., "results": ...}, when --json was given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
        print(f"wrote {path}")


def decode_rate(store: ActivationStore, files: list[str], threads: int) -> float | None:
    """Decoded bytes/s of the codec alone, on chunk objects already in memory."""
    codec = store.chunk_codec(array_key(LOC))
    if codec.uncompressed:
        return None
    blobs = [open(f, "rb").read() for f in files]
    shape = (store.chunk_images, store.n_tokens, store.d_model)
    outs: dict[int, np.ndarray] = {}

    def dec(b: bytes) -> None:
        out = outs.setdefault(threading.get_ident(), np.empty(shape, np.float16))
        codec.decode_into(b, out, "bench")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(dec, blobs))
    return len(blobs) * np.prod(shape) * 2 / (time.perf_counter() - t0)


def reader_rate(make, seconds_cap: float = 60.0) -> tuple[float, int]:
    """Tokens/s over one full pass of a reader (first batch excluded: thread and buffer start-up)."""
    reader = make()
    it = iter(reader)
    first = next(it)
    n = 0
    t0 = time.perf_counter()
    for item in it:
        x = item[0] if isinstance(item, tuple) else item
        n += x.shape[0]
        if time.perf_counter() - t0 > seconds_cap:
            break
    dt = time.perf_counter() - t0
    reader.close()
    del first
    return n / dt, n


def saev_style_rate(path: Path, store: ActivationStore, batch: int, seconds: float, rng) -> float:
    """saev-style: a flat fp32 memmap [tokens, d]; each batch gathered one row at a time."""
    n_rows = store.n_images * store.n_tokens
    mm_path = path / "flat_fp32.bin"
    mm = np.memmap(mm_path, dtype=np.float32, mode="w+", shape=(n_rows, store.d_model))
    pos = 0
    for a, b in store.row_ranges():
        for r in range(a, b, 64):
            x = store.read_rows(LOC, r, min(r + 64, b)).reshape(-1, store.d_model)
            mm[pos:pos + len(x)] = x
            pos += len(x)
    mm.flush()
    mm = np.memmap(mm_path, dtype=np.float32, mode="r", shape=(n_rows, store.d_model))
    # a reservoir filled and refilled one row at a time from rows in random order, batches
    # gathered from it one row at a time: saev's shuffled loader, in one process
    source = iter(rng.permutation(n_rows))
    reservoir = np.empty((4 * batch, store.d_model), np.float32)
    for k in range(len(reservoir)):
        reservoir[k] = mm[next(source)]
    out = np.empty((batch, store.d_model), np.float32)
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for j, k in enumerate(rng.integers(0, len(reservoir), batch)):
            out[j] = reservoir[k]
            row = next(source, None)
            if row is None:
                source = iter(rng.permutation(n_rows))
                row = next(source)
            reservoir[k] = mm[row]
        torch.from_numpy(out.copy())
        n += batch
    rate = n / (time.perf_counter() - t0)
    del mm
    os.remove(mm_path)
    return rate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--buffer-tokens", type=int, default=2**19)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--codecs", default="none,shuffle-zstd")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", "--json", dest="out", default="benchmarks/results/read_throughput.json")
    args = ap.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="read_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows, tok_bytes = [], args.d_model * 2
    try:
        for codec in args.codecs.split(","):
            store = build_store(work / f"store-{codec}", args.images, args.d_model, codec)
            files = chunk_files(store)
            r: dict = {"codec": codec, "images": store.n_images, "tokens": store.n_token_rows,
                       "disk_bytes": sum(os.path.getsize(f) for f in files)}
            ratio = store.n_token_rows * tok_bytes / r["disk_bytes"]

            def shuffled(dtype="float32", device="cpu"):
                return ShuffledReader(store, LOC, batch_size=args.batch_size, buffer_tokens=args.buffer_tokens,
                                      threads=args.threads, dtype=dtype, device=device, seed=1)

            for state in ("warm", "cold"):
                prepare = warm if state == "warm" else evict
                prepare(files)
                r[f"pread_{state}"] = pread_rate(files, args.threads, rng) * ratio / tok_bytes  # tokens/s
                prepare(files)  # float32 and fp16 out back to back: their ratio is what matters
                r[f"shuffled_{state}"], _ = reader_rate(shuffled)
                prepare(files)
                r["shuffled_fp16_out" + ("_cold" if state == "cold" else "")], _ = reader_rate(lambda: shuffled("float16"))
            warm(files)
            r["ordered"], _ = reader_rate(lambda: OrderedReader(store, LOC, batch_size=args.batch_size,
                                                                buffer_tokens=args.buffer_tokens, threads=args.threads))
            cls_rate, _ = reader_rate(lambda: OrderedReader(store, LOC, tokens="cls", batch_size=256,
                                                            threads=args.threads))
            r["cls_only"] = cls_rate
            dec = decode_rate(store, files, args.threads)
            r["decode_only"] = dec / tok_bytes if dec else None
            if args.device.startswith("cuda"):
                r["shuffled_into_gpu"], _ = reader_rate(lambda: shuffled("float32", args.device))
            rows.append(r)
            if codec == "none":
                saev = saev_style_rate(work, store, args.batch_size, 5.0, rng)
            shutil.rmtree(work / f"store-{codec}", ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    def gb(tokens_s):
        return tokens_s * tok_bytes / 1e9

    print(f"{'codec':<13} {'reader':<22} {'tokens/s':>10} {'GB/s':>6} {'x ceiling':>9} {'x decode':>8} {'x saev-style':>12}")
    print("-" * 86)
    for r in rows:
        ceiling = r["pread_warm"]
        for name, key, cache in (("shuffled (warm)", "shuffled_warm", "warm"), ("shuffled (cold)", "shuffled_cold", "cold"),
                                 ("shuffled fp16 out", "shuffled_fp16_out", "warm"),
                                 ("shuffled fp16 out cold", "shuffled_fp16_out_cold", "cold"), ("ordered", "ordered", "warm"),
                                 ("CLS only (ordered)", "cls_only", "warm"), ("into GPU", "shuffled_into_gpu", "warm"),
                                 ("pread ceiling (warm)", "pread_warm", "warm"), ("pread ceiling (cold)", "pread_cold", "cold"),
                                 ("codec decode only", "decode_only", "-")):
            v = r.get(key)
            if v is None:
                continue
            ref = r[f"pread_{cache}"] if cache in ("warm", "cold") else ceiling
            xdec = f"{v / r['decode_only']:.2f}" if r.get("decode_only") and key.startswith("shuffled") else "-"
            print(f"{r['codec']:<13} {name:<22} {v:>10,.0f} {gb(v):>6.2f} {v / ref:>9.2f} {xdec:>8} {v / saev:>12.0f}")
    for r in rows:
        r["float32_over_fp16_out_warm"] = r["shuffled_warm"] / r["shuffled_fp16_out"]
        r["float32_over_fp16_out_cold"] = r["shuffled_cold"] / r["shuffled_fp16_out_cold"]
        print(f"{r['codec']:<13} float32 out / fp16 out: warm {r['float32_over_fp16_out_warm']:.2f}, "
              f"cold {r['float32_over_fp16_out_cold']:.2f}")
    print(f"{'none':<13} {'saev-style (warm)':<22} {saev:>10,.0f} {saev * tok_bytes / 1e9:>6.2f}"
          f"   (fp32 memmap, per-row reservoir; GB/s counted as fp16 like the rest)")
    print("\ntokens/s of d_model-wide vectors; GB/s of fp16; 'x ceiling' = / raw pread of the same files (same cache state);"
          " 'x decode' = / the codec's standalone decode rate; float32 output unless noted; CLS-only counts CLS tokens.")
    meta = {"machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"},
            "images": args.images, "d_model": args.d_model, "batch_size": args.batch_size,
            "buffer_tokens": args.buffer_tokens, "threads": args.threads}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": rows, "saev_style_tokens_s": saev}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
