"""Shuffled-reader throughput from an object store, beside raw concurrent GETs of the very same
chunk objects at the same concurrency, in the same run (interleaved repetitions).

    python benchmarks/read_s3.py                      # a moto S3 server on 127.0.0.1, started here
    python benchmarks/read_s3.py --endpoint-url http://127.0.0.1:9000 --url s3://bucket/bench.zarr
                                                      # any S3-compatible endpoint (MinIO, Ceph, R2,
                                                      # AWS ...); credentials from the environment

Baseline: every chunk object of the location GET whole, in a random order, `--concurrency` at a
time, through the same client the reader uses (`Storage.get`: obstore on S3, whose bodies are
received without the GIL, or with ACTSTORE_S3_CLIENT=fsspec s3fs's read client; no client-side
retries, no SDK response checksum), bytes discarded, timed after one connecting GET. Reader: ShuffledReader with io_concurrency = the same
concurrency, timed from the start of its iteration to its last batch (the epoch's metadata reads
and the first window's load included).
Both are reported in tokens/s of committed tokens (the baseline's bytes include the chunks'
padding rows, which the reader also fetches).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from activation_store import ShuffledReader
from activation_store.store import ActivationStore, ImageRecord, StoreConfig, open_store
from activation_store.store.layout import array_key, chunk_key

sys.path.insert(0, str(Path(__file__).parent))
from read_throughput import write_results  # noqa: E402
from activation_store.store.storage import Storage
from activation_store.synthetic import synthetic_activations

LOC = "resid_22"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _MotoProcess:
    """moto's S3 server in a process of its own (as any real endpoint is: outside the reader's
    interpreter, so its request handling does not take the reader's GIL)."""

    def __init__(self, port: int, cpus: set[int] | None = None) -> None:
        # With `cpus`, the server runs on those cores only (os.sched_setaffinity in the child before
        # it starts Python), as a remote endpoint runs on cores of its own.
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pin)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"moto's server exited with {self.proc.returncode} before it listened on {port}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"moto's server did not listen on {port} within 60 s")
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_moto(in_process: bool = False, cpus: set[int] | None = None):
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "NO_PROXY": "127.0.0.1,localhost"}.items():
        os.environ.setdefault(k, v)
    port = free_port()
    if not in_process:
        return _MotoProcess(port, cpus), f"http://127.0.0.1:{port}"
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def build_store(url: str, opts: dict, n_images: int, d: int, codec: str, chunk_images: int) -> ActivationStore:
    store = ActivationStore.create(url, locations=[LOC], n_tokens=257, d_model=d, storage_options=opts,
                                   config=StoreConfig(codec=codec, chunk_images=chunk_images, region_images=256))
    per_shard = 256
    n_shards = -(-n_images // per_shard)
    store.plan_shards([(f"s{i}", min(per_shard, n_images - i * per_shard)) for i in range(n_shards)])
    for i in range(n_shards):
        n = min(per_shard, n_images - i * per_shard)
        with store.writer(f"s{i}", compute_stats=False) as w:
            for j in range(0, n, chunk_images):
                k = min(chunk_images, n - j)
                w.add({LOC: synthetic_activations(i * 1000 + j, k, 257, d, np.float16)},
                      [ImageRecord(f"{i}-{j + t}") for t in range(k)])
    return open_store(url, opts)


def raw_get_rate(url: str, opts: dict, keys: list[str], concurrency: int, tokens: int, rng) -> dict:
    """Tokens/s (and MB/s) of GETting every key whole, in a random order, `concurrency` at a time,
    through the client the reader's GETs use (`Storage.get`: obstore on S3, or fsspec's read client
    with ACTSTORE_S3_CLIENT=fsspec), bytes discarded."""
    storage = Storage(url, opts)
    order = [keys[i] for i in rng.permutation(len(keys))]
    storage.get(order[0])  # connect (the reader's store is already open, too)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        nbytes = sum(len(b) for b in pool.map(storage.get, order))
    dt = time.perf_counter() - t0
    return {"tokens_s": tokens / dt, "MB_s": nbytes / dt / 1e6, "seconds": dt,
            "client": "obstore" if storage.object_getter() is not None else "fsspec"}


def reader_rate(url: str, opts: dict, args, dtype: str) -> dict:
    """Tokens/s of one epoch, timed from the start of iteration (the epoch's own metadata reads and
    the first window's load included; the reader's construction, like the baseline's connection,
    not)."""
    store = open_store(url, opts)
    reader = ShuffledReader(store, LOC, batch_size=args.batch_size, buffer_tokens=args.buffer_tokens,
                            threads=args.threads, io_concurrency=args.concurrency, prefetch=args.prefetch,
                            dtype=dtype, seed=1)
    n = 0
    t0 = time.perf_counter()
    for x in reader:
        n += x.shape[0]
    dt = time.perf_counter() - t0
    reader.close()
    return {"tokens_s": n / dt, "tokens": n, "seconds": dt, "GETs": store.storage.get_attempts}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (default: start moto on 127.0.0.1)")
    ap.add_argument("--url", default="s3://bench/read_s3.zarr", help="where the benchmark store is written")
    ap.add_argument("--reuse", action="store_true", help="read the store already at --url instead of writing one")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--codec", default="none")
    ap.add_argument("--chunk-images", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--buffer-tokens", type=int, default=16 * 16 * 257, help="tokens per window (default: 16 chunks)")
    ap.add_argument("--threads", type=int, default=4, help="reader decode threads")
    ap.add_argument("--concurrency", default="4,8", help="GETs in flight (comma list): baseline and io_concurrency")
    ap.add_argument("--prefetch", type=int, default=16)
    ap.add_argument("--dtypes", default="float16,float32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default="benchmarks/results/read_s3.json")
    ap.add_argument("--moto-in-process", action="store_true",
                    help="run moto in this process's threads (as runs before 2026-12-01 did: its request handling "
                         "then shares the reader's GIL); default: a process of its own")
    ap.add_argument("--split-cpus", action="store_true",
                    help="give moto's process the first CPU of this process's affinity and this process (the raw "
                         "GETs and the reader alike) the others, as a remote endpoint has cores of its own; "
                         "default: all share every CPU")
    args = ap.parse_args(argv)
    if args.split_cpus and (args.moto_in_process or args.endpoint_url):
        ap.error("--split-cpus pins the moto server this benchmark starts in its own process; "
                 "drop --moto-in-process / --endpoint-url")
    all_cpus = sorted(os.sched_getaffinity(0))
    server_cpus = None
    if args.split_cpus:
        if len(all_cpus) < 2:
            ap.error("--split-cpus needs at least two CPUs in this process's affinity")
        server_cpus = {all_cpus[0]}
        os.sched_setaffinity(0, set(all_cpus[1:]))

    server = None
    endpoint = args.endpoint_url
    if endpoint is None:
        server, endpoint = start_moto(args.moto_in_process, server_cpus)
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=args.url.split("/")[2])
    opts = {"endpoint_url": endpoint}
    try:
        if args.reuse:
            store = open_store(args.url, opts)
        else:
            t0 = time.perf_counter()
            store = build_store(args.url, opts, args.images, args.d_model, args.codec, args.chunk_images)
            print(f"wrote {store.n_images} images to {args.url} in {time.perf_counter() - t0:.1f}s", flush=True)
        keys = [chunk_key(array_key(LOC), c.index, 3) for c in store.chunk_refs(LOC)]
        tokens = store.n_token_rows
        rng = np.random.default_rng(0)
        rows = []
        for conc in (int(c) for c in args.concurrency.split(",")):
            args.concurrency_now = conc
            r: dict = {"concurrency": conc, "raw": [], **{dt: [] for dt in args.dtypes.split(",")}}
            for _ in range(args.repeats):
                r["raw"].append(raw_get_rate(args.url, opts, keys, conc, tokens, rng))
                for dt in args.dtypes.split(","):
                    a = argparse.Namespace(**{**vars(args), "concurrency": conc})
                    r[dt].append(reader_rate(args.url, opts, a, dt))
                print(f"concurrency {conc}: raw {r['raw'][-1]['tokens_s']:,.0f} tokens/s; " + "; ".join(
                    f"{dt} {r[dt][-1]['tokens_s']:,.0f}" for dt in args.dtypes.split(",")), flush=True)
            rows.append(r)
    finally:
        if server is not None:
            server.stop()

    print(f"\n{'GETs in flight':>14} {'rep':>3} {'raw GET tokens/s':>16} {'raw MB/s':>8} "
          + " ".join(f"{'reader ' + dt:>16} {'x raw':>6}" for dt in args.dtypes.split(",")))
    for r in rows:
        for i, raw in enumerate(r["raw"]):
            cells = " ".join(f"{r[dt][i]['tokens_s']:>16,.0f} {r[dt][i]['tokens_s'] / raw['tokens_s']:>6.2f}"
                             for dt in args.dtypes.split(","))
            print(f"{r['concurrency']:>14} {i + 1:>3} {raw['tokens_s']:>16,.0f} {raw['MB_s']:>8.0f} {cells}")
    endpoint_label = (("moto in this process" if args.moto_in_process else "moto in its own process")
                      + (f" on CPU {sorted(server_cpus)}, this process on CPUs {sorted(os.sched_getaffinity(0))}"
                         if server_cpus else "") + " (127.0.0.1)") if server else endpoint
    print(f"\n{store.n_images} images x 257 tokens x d {store.d_model} ({args.codec}), {len(keys)} chunk objects of "
          f"{args.chunk_images} images; reader: windows of {args.buffer_tokens:,} tokens, prefetch {args.prefetch}, "
          f"{args.threads} decode threads; endpoint {endpoint_label}")
    meta = {"machine": {"cpus": len(all_cpus), "platform": platform.platform(), "load": os.getloadavg()},
            "endpoint": endpoint_label, "server_cpus": sorted(server_cpus) if server_cpus else None,
            "client_cpus": sorted(os.sched_getaffinity(0)), "images": store.n_images,
            "d_model": store.d_model, "codec": args.codec, "chunk_objects": len(keys),
            "buffer_tokens": args.buffer_tokens, "prefetch": args.prefetch, "threads": args.threads}
    write_results(args.json, meta, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
