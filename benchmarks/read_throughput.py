"""Reader throughput: tokens/s and GB/s of the shuffled, ordered and CLS-only readers per codec
preset, beside (a) a raw pread of the same chunk files (the ceiling), (b) the codec's standalone
decode rate (compressed presets), and (c) a saev-style baseline (flat fp32 memmap, batches
gathered one row at a time), all on the same data in the same run.

    python benchmarks/read_throughput.py                  # 1,024 images x 257 tokens x 1024 (0.54 GB fp16)
    python benchmarks/read_throughput.py --device cuda    # also: tokens/s delivered into GPU memory
    python benchmarks/read_throughput.py --json out.json  # where the JSON goes
    python benchmarks/read_throughput.py --store-dtypes fp16,fp8 --codecs none --repeats 3
        # the fp16 store and its fp8 conversion (`actstore convert`: the same images), passes
        # interleaved fp16, fp8, fp16, fp8, ...; prints fp8 / fp16 tokens/s per reader and cache state

fp8 stores (one e4m3 byte a value plus a float32 scale a token): their chunk files and scale
files are what pread reads and what the cache states apply to; "bytes/value" counts every object
under the location's data and scale arrays over the values stored.

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
from activation_store.store.audit import info
from activation_store.store.encoding import physical_dtype
from activation_store.store.layout import array_key, chunk_key, scale_array_key
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
    """The committed chunk files of LOC's main array, and (fp8) of its scale array."""
    files = [store.storage.path(chunk_key(array_key(LOC), c.index, 3)) for c in store.chunk_refs(LOC)]
    if store.quantized:
        files += [store.storage.path(chunk_key(scale_array_key(array_key(LOC)), c.index, 2)) for c in store.chunk_refs(LOC)]
    return files


def converted_store(src: ActivationStore, path: Path, dtype: str) -> ActivationStore:
    """`actstore convert SRC DST --store-dtype DTYPE`: the same images in another storage dtype."""
    from activation_store.store.convert import ConvertConfig, convert

    shutil.rmtree(path, ignore_errors=True)
    convert(ConvertConfig(src=src.url, dst=str(path), store_dtype=dtype, progress=False))
    return open_store(str(path))


def bytes_per_value(store: ActivationStore) -> dict:
    """Bytes on disk per stored value of LOC: every object under its main array and (fp8) its scale
    array (metadata, padding chunks of regions included), beside `actstore info`'s figure (committed
    chunks and their scales only)."""
    root = Path(store.url)
    total = 0
    for key in [array_key(LOC)] + ([scale_array_key(array_key(LOC))] if store.quantized else []):
        total += sum(f.stat().st_size for f in (root / key).rglob("*") if f.is_file())
    values = store.n_images * store.n_tokens * store.d_model
    return {"all_objects": total / values, "info": info(store)["per_location"][LOC]["bytes_per_value"],
            "object_bytes": total, "values": values}


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
    shape = (store.chunk_images, store.n_tokens, store.d_model)
    files = files[:len(store.chunk_refs(LOC))]  # the codes (fp8: not the scale files after them)
    blobs = [open(f, "rb").read() for f in files]
    outs: dict[int, np.ndarray] = {}

    def dec(b: bytes) -> None:
        out = outs.setdefault(threading.get_ident(), np.empty(shape, physical_dtype(store.dtype)))
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


def median(xs: list[float]) -> float:
    return float(np.median(xs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--buffer-tokens", type=int, default=2**19)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--codecs", default="none,shuffle-zstd")
    ap.add_argument("--store-dtypes", default="fp16",
                    help="storage dtypes to read, e.g. fp16,fp8: the fp16 store is written, the others converted "
                         "from it (the same images); their passes interleaved")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved passes per reader and cache state (median kept)")
    ap.add_argument("--skip-saev", action="store_true", help="no saev-style baseline (it writes an fp32 copy)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", "--json", dest="out", default="benchmarks/results/read_throughput.json")
    args = ap.parse_args(argv)
    dtypes = args.store_dtypes.split(",")
    if dtypes[0] != "fp16":
        ap.error("--store-dtypes must start with fp16 (the store written; the others are converted from it)")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="read_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows, tok_bytes = [], args.d_model * 2
    saev = None
    load = {"before": os.getloadavg()}
    try:
        for codec in args.codecs.split(","):
            base = build_store(work / f"store-{codec}", args.images, args.d_model, codec)
            stores = {"fp16": base}
            for dt in dtypes[1:]:
                t0 = time.perf_counter()
                stores[dt] = converted_store(base, work / f"store-{codec}-{dt}", dt)
                print(f"converted {codec} fp16 -> {dt} in {time.perf_counter() - t0:.0f}s", flush=True)
            files = {dt: chunk_files(st) for dt, st in stores.items()}
            res: dict[str, dict] = {}
            for dt, st in stores.items():
                disk = sum(os.path.getsize(f) for f in files[dt])
                res[dt] = {"codec": codec, "store_dtype": dt, "images": st.n_images, "tokens": st.n_token_rows,
                           "disk_bytes": disk, "bytes_per_value": bytes_per_value(st)}
                res[dt]["_ratio"] = st.n_token_rows * tok_bytes / disk  # decoded fp16 bytes per byte read

            def shuffled(st, dtype="float32", device="cpu"):
                return ShuffledReader(st, LOC, batch_size=args.batch_size, buffer_tokens=args.buffer_tokens,
                                      threads=args.threads, dtype=dtype, device=device, seed=1)

            def record(dt, key, value):
                res[dt].setdefault(key + "_passes", []).append(value)

            for state in ("warm", "cold"):
                prepare = warm if state == "warm" else evict
                cold = "_cold" if state == "cold" else ""
                for _ in range(args.repeats):
                    for dt, st in stores.items():  # fp16, fp8, fp16, fp8, ...: the same load for both
                        f = files[dt]
                        prepare(f)
                        record(dt, f"pread_{state}", pread_rate(f, args.threads, rng) * res[dt]["_ratio"] / tok_bytes)
                        prepare(f)  # float32 and fp16 out back to back: their ratio is what matters
                        record(dt, f"shuffled_{state}", reader_rate(lambda: shuffled(st))[0])
                        prepare(f)
                        record(dt, "shuffled_fp16_out" + cold, reader_rate(lambda: shuffled(st, "float16"))[0])
                        print(f"  {codec} {dt} {state}: pread {res[dt][f'pread_{state}_passes'][-1]:,.0f}, float32 out "
                              f"{res[dt][f'shuffled_{state}_passes'][-1]:,.0f}, fp16 out "
                              f"{res[dt]['shuffled_fp16_out' + cold + '_passes'][-1]:,.0f} tokens/s  "
                              f"(load {os.getloadavg()[0]:.2f})", flush=True)
            for _ in range(args.repeats):
                for dt, st in stores.items():
                    warm(files[dt])
                    record(dt, "ordered", reader_rate(lambda: OrderedReader(st, LOC, batch_size=args.batch_size,
                                                                            buffer_tokens=args.buffer_tokens,
                                                                            threads=args.threads))[0])
                    record(dt, "cls_only", reader_rate(lambda: OrderedReader(st, LOC, tokens="cls", batch_size=256,
                                                                             threads=args.threads))[0])
            for dt, st in stores.items():
                r = res[dt]
                for key in [k for k in r if k.endswith("_passes")]:
                    r[key[:-len("_passes")]] = median(r[key])
                dec = decode_rate(st, files[dt], args.threads)
                r["decode_only"] = dec / tok_bytes if dec else None  # tokens/s (decoded storage bytes / fp16 bytes)
                if args.device.startswith("cuda"):
                    r["shuffled_into_gpu"], _ = reader_rate(lambda: shuffled(st, "float32", args.device))
                del r["_ratio"]
                rows.append(r)
            if codec == "none" and not args.skip_saev:
                saev = saev_style_rate(work, base, args.batch_size, 5.0, rng)
            for dt in stores:
                shutil.rmtree(work / (f"store-{codec}" + ("" if dt == "fp16" else f"-{dt}")), ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    load["after"] = os.getloadavg()

    def gb(tokens_s):
        return tokens_s * tok_bytes / 1e9

    print(f"\n{'codec':<13} {'dtype':<5} {'reader':<22} {'tokens/s':>10} {'GB/s':>6} {'x ceiling':>9} {'x decode':>8} "
          f"{'x saev-style':>12}")
    print("-" * 92)
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
            xsaev = f"{v / saev:>12.0f}" if saev else f"{'-':>12}"
            print(f"{r['codec']:<13} {r['store_dtype']:<5} {name:<22} {v:>10,.0f} {gb(v):>6.2f} {v / ref:>9.2f} {xdec:>8} "
                  f"{xsaev}")
    for r in rows:
        r["float32_over_fp16_out_warm"] = r["shuffled_warm"] / r["shuffled_fp16_out"]
        r["float32_over_fp16_out_cold"] = r["shuffled_cold"] / r["shuffled_fp16_out_cold"]
        # each interleaved pair on its own (the passes of one pair share the machine's state; on a
        # shared machine the median of these is steadier than the ratio of the medians)
        for cache, f32, f16 in (("warm", "shuffled_warm_passes", "shuffled_fp16_out_passes"),
                                ("cold", "shuffled_cold_passes", "shuffled_fp16_out_cold_passes")):
            pairs = [a / b for a, b in zip(r.get(f32) or [], r.get(f16) or [])]
            r[f"float32_over_fp16_out_{cache}_per_pass"] = pairs
        per_pass = ", ".join(f"{x:.2f}" for x in r["float32_over_fp16_out_warm_per_pass"])
        b = r["bytes_per_value"]
        print(f"{r['codec']:<13} {r['store_dtype']:<5} float32 out / fp16 out: warm {r['float32_over_fp16_out_warm']:.2f} "
              f"(per interleaved pass: {per_pass}), cold {r['float32_over_fp16_out_cold']:.2f}; bytes/value {b['all_objects']:.4f} (every object of the "
              f"data{' and scale' if r['store_dtype'] == 'fp8' else ''} arrays; info: {b['info']:.4f})")
    ratios = []
    by = {(r["codec"], r["store_dtype"]): r for r in rows}
    for (codec, dt), r in by.items():
        if dt == "fp16":
            continue
        f16 = by[(codec, "fp16")]
        q = {k: r[k] / f16[k] if f16[k] else float("nan") for k in ("shuffled_warm", "shuffled_fp16_out", "shuffled_cold", "shuffled_fp16_out_cold",
                                        "ordered", "cls_only", "pread_warm", "pread_cold")}
        # the same ratio pass by pass (each dt pass right after its fp16 pass)
        q["per_pass"] = {k: [a / b if b else float("nan") for a, b in zip(r[k + "_passes"], f16[k + "_passes"])]
                         for k in ("shuffled_warm", "shuffled_fp16_out", "shuffled_cold", "shuffled_fp16_out_cold")}
        ratios.append({"codec": codec, "store_dtype": dt, "over_fp16_store": q})
        print(f"{codec:<13} {dt:<5} tokens/s over the fp16 store's: float32 out warm {q['shuffled_warm']:.2f}, cold "
              f"{q['shuffled_cold']:.2f}; fp16 out warm {q['shuffled_fp16_out']:.2f}, cold {q['shuffled_fp16_out_cold']:.2f}; "
              f"ordered {q['ordered']:.2f}, CLS {q['cls_only']:.2f}; pread warm {q['pread_warm']:.2f}, cold {q['pread_cold']:.2f}")
    if saev:
        print(f"{'none':<13} {'fp16':<5} {'saev-style (warm)':<22} {saev:>10,.0f} {saev * tok_bytes / 1e9:>6.2f}"
              f"   (fp32 memmap, per-row reservoir; GB/s counted as fp16 like the rest)")
    print("\ntokens/s of d_model-wide vectors; GB/s of fp16; 'x ceiling' = / raw pread of the same files (same cache state);"
          " 'x decode' = / the codec's standalone decode rate; float32 output unless noted; CLS-only counts CLS tokens;"
          f" medians of {args.repeats} interleaved passes; load average {load['before'][0]:.2f} before, "
          f"{load['after'][0]:.2f} after.")
    meta = {"machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                        "load": load},
            "images": args.images, "d_model": args.d_model, "batch_size": args.batch_size,
            "buffer_tokens": args.buffer_tokens, "threads": args.threads, "store_dtypes": dtypes,
            "repeats": args.repeats}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": rows, "store_dtype_ratios": ratios,
                                          "saev_style_tokens_s": saev}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
