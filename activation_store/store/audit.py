"""`info` and `verify`: what a store holds, and whether every byte of it is what was written."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from activation_store.store import layout
from activation_store.store.activation_store import ActivationStore, ShardInfo
from activation_store.store.chunk_io import CRC_BYTES, crc_matches
from activation_store.store.encoding import physical_dtype
from activation_store.store.images import from_parquet_bytes


def _chunk_index(key: str, array_key: str) -> int | None:
    """Axis-0 chunk index of an object key of `array_key`, or None for its metadata."""
    prefix = f"{array_key}/c/"
    if not key.startswith(prefix):
        return None
    return int(key[len(prefix):].split("/")[0])


def _owner(shards: list[ShardInfo], row: int) -> ShardInfo | None:
    for s in shards:
        if s.row_start <= row < s.row_start + s.region_rows:
            return s
    return None


@dataclass
class _ArrayObjects:
    """Sizes of the chunk objects of one array, split by the state of the shard owning them."""

    committed: dict[str, int] = field(default_factory=dict)
    pending: dict[str, int] = field(default_factory=dict)
    orphan: dict[str, int] = field(default_factory=dict)


def _classify(store: ActivationStore, files: dict[str, int], array_key: str, rows_per_chunk: int) -> _ArrayObjects:
    shards = store.shards()
    out = _ArrayObjects()
    for key, size in files.items():
        c = _chunk_index(key, array_key)
        if c is None:
            continue
        owner = _owner(shards, c * rows_per_chunk)
        if owner is None:
            out.orphan[key] = size
        elif owner.committed and c * rows_per_chunk < owner.row_stop:
            out.committed[key] = size
        else:
            out.pending[key] = size
    return out


def info(store: ActivationStore) -> dict:
    """A summary of the store, as a JSON-able dict (`actstore info --json`)."""
    shards = store.shards(refresh=True)
    by_state: dict[str, int] = {}
    by_status: dict[str, int] = {}
    for s in shards:
        by_state[s.state] = by_state.get(s.state, 0) + 1
        for k, v in s.commit.get("by_status", {}).items() if s.committed else ():
            by_status[k] = by_status.get(k, 0) + v
    files = store.storage.list_files("")
    n_images = store.n_images
    locations = {}
    for loc in store.locations:
        main = _classify(store, files, layout.array_key(loc), store.chunk_images)
        cls_objs = _classify(store, files, layout.cls_array_key(loc), store.region_images)
        main_bytes = sum(main.committed.values())
        values = n_images * store.n_tokens * store.d_model
        entry = {
            "committed_chunks": len(main.committed),
            "pending_chunks": len(main.pending),
            "bytes_on_disk": sum(main.committed.values()) + sum(main.pending.values()) + sum(main.orphan.values()),
            "cls_bytes_on_disk": sum(cls_objs.committed.values()) + sum(cls_objs.pending.values()),
            "bytes_per_value": (main_bytes / values) if values else None,
            "compression_ratio": (values * physical_dtype(store.dtype).itemsize / main_bytes)
            if main_bytes
            else None,
        }
        if n_images and all(s.commit.get("stats_complete", True) for s in store.committed_shards()):
            entry["stats"] = {g: m.summary() for g, m in store.stats_by_group(loc).items()}
        if store.codec.lossy:
            entry["lossy_error"] = store.lossy_error(loc)
        locations[loc] = entry
    a = store.attrs
    return {
        "url": store.url,
        "format_version": a["format_version"],
        "software_version": a["software_version"],
        "created_at": a.get("created_at"),
        "model": a.get("model", {}),
        "locations": store.locations,
        "n_tokens": store.n_tokens,
        "d_model": store.d_model,
        "dtype": store.dtype,
        "codec": a["codec"],
        "chunk_images": store.chunk_images,
        "region_images": store.region_images,
        "images": n_images,
        "tokens": n_images * store.n_tokens,
        "capacity_images": store.capacity,
        "shards": {"planned": len(shards), **by_state},
        "images_by_status": by_status,
        "total_bytes_on_disk": sum(files.values()),
        "per_location": locations,
    }


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def format_info(d: dict) -> str:
    model = d["model"] or {}
    codec = d["codec"]
    lines = [
        f"store      {d['url']}",
        f"format     v{d['format_version']} (written by activation-store {d['software_version']}, {d['created_at']})",
        f"model      {model.get('name', '-')} / {model.get('pretrained', '-')}" if model else "model      -",
        f"layout     {d['n_tokens']} tokens x d_model {d['d_model']}, {d['dtype']}, "
        f"{d['chunk_images']} images per chunk, regions of {d['region_images']} images",
        f"codec      {codec['preset']}" + (f" (zstd level {codec['zstd_level']})" if "zstd" in codec["preset"] else "")
        + (f", keepbits {codec['keepbits']}, error bound {codec['error_bound']}" if codec.get("keepbits") else ""),
        f"images     {d['images']:,} committed ({d['tokens']:,} tokens per location); capacity {d['capacity_images']:,}",
        "shards     " + ", ".join(f"{k} {v}" for k, v in d["shards"].items()),
    ]
    if d["images_by_status"]:
        lines.append("outcomes   " + ", ".join(f"{k} {v}" for k, v in sorted(d["images_by_status"].items())))
    lines.append(f"on disk    {_fmt_bytes(d['total_bytes_on_disk'])} in all")
    lines.append("")
    head = f"{'location':<10} {'chunks':>7} {'pending':>7} {'on disk':>10} {'B/value':>8} {'ratio':>6} {'E|x|^2':>10} {'mean var':>9} {'max|x|':>8}"
    lines.append(head)
    lines.append("-" * len(head))
    for loc, e in d["per_location"].items():
        s = e.get("stats", {}).get("all", {})
        bpv = f"{e['bytes_per_value']:.3f}" if e["bytes_per_value"] else "-"
        ratio = f"{e['compression_ratio']:.2f}" if e["compression_ratio"] else "-"
        lines.append(
            f"{loc:<10} {e['committed_chunks']:>7} {e['pending_chunks']:>7} {_fmt_bytes(e['bytes_on_disk']):>10} "
            f"{bpv:>8} {ratio:>6} {s.get('mean_sq_norm', float('nan')):>10.4g} {s.get('mean_var', float('nan')):>9.4g} "
            f"{s.get('max_abs', float('nan')):>8.4g}"
        )
        if e.get("lossy_error"):
            le = e["lossy_error"]
            lines.append(f"{'':<10} lossy error: max rel {le['max_rel']:.3g}, relative RMSE {le['relative_rmse']:.3g}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- verify
@dataclass
class Problem:
    where: str  # a chunk key, a shard name or "store"
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def _crc_ok(data: bytes) -> bool:
    """Zarr's crc32c codec appends the little-endian crc32c of the preceding bytes."""
    return len(data) >= CRC_BYTES and crc_matches(memoryview(data)[:-CRC_BYTES], data[-CRC_BYTES:])


def verify(store: ActivationStore, workers: int = 8, progress: bool = True) -> list[Problem]:
    """Check every checksum, every committed shard's chunks, statistics and image table.
    Returns the problems found (empty when the store is sound)."""
    problems: list[Problem] = []
    shards = store.shards(refresh=True)
    files = store.storage.list_files("")

    # regions: aligned, inside the arrays, not overlapping
    spans = sorted((s.row_start, s.row_start + s.region_rows, s.name) for s in shards)
    for (a0, a1, an), (b0, _b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            problems.append(Problem(bn, f"region overlaps {an} ({b0} < {a1})"))
    for s in shards:
        if s.row_start % store.region_images or s.region_rows % store.region_images:
            problems.append(Problem(s.name, "region not aligned to region_images"))
        if s.row_start + s.region_rows > store.capacity:
            problems.append(Problem(s.name, f"region ends at {s.row_start + s.region_rows}, beyond the arrays ({store.capacity})"))

    for s in (s for s in shards if s.committed):
        problems += _verify_shard(store, s, files)

    # every checksummed object: chunks of all arrays (committed or pending) and shard statistics
    keys = [k for k in files if "/c/" in k]
    def check(key: str) -> Problem | None:
        data = store.storage.read_bytes(key)
        if data is None:
            return Problem(key, "listed but unreadable")
        if not _crc_ok(data):
            return Problem(_describe_chunk(store, key, shards), "crc32c checksum mismatch (the chunk's bytes changed after writing)")
        return None

    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(check, keys)
        for p in tqdm(results, total=len(keys), desc="checksums", unit="chunk", disable=not progress):
            if p is not None:
                problems.append(p)
    return problems


def _describe_chunk(store: ActivationStore, key: str, shards: list[ShardInfo]) -> str:
    for loc in store.locations:
        for array_key, rows in ((layout.array_key(loc), store.chunk_images), (layout.cls_array_key(loc), store.region_images)):
            c = _chunk_index(key, array_key)
            if c is not None:
                owner = _owner(shards, c * rows)
                shard = f"shard {owner.name} ({owner.source}, {owner.state})" if owner else "no shard"
                return f"{key} (rows {c * rows}-{(c + 1) * rows - 1}, {shard})"
    return key


def _verify_shard(store: ActivationStore, s: ShardInfo, files: dict[str, int]) -> list[Problem]:
    problems = []
    c = s.commit
    n = s.n_rows
    if n > s.capacity:
        problems.append(Problem(s.name, f"commit says {n} rows, more than the {s.capacity} planned"))
    for loc in store.locations:
        for cls, ndim in ((False, 3), (True, 2)):
            for ref in store.chunk_refs(loc, cls=cls, shards=[s.index]):
                key = layout.chunk_key(ref.array_key, ref.index, ndim)
                if key not in files:
                    problems.append(Problem(key, f"missing, but shard {s.name} ({s.source}) is committed with rows up to {s.row_start + n - 1}"))
    data = store.storage.read_bytes(layout.shard_images_key(s.index))
    if data is None:
        problems.append(Problem(s.name, "images.parquet is missing"))
    else:
        try:
            table = from_parquet_bytes(data)
            rows = np.asarray(table["row"].to_numpy())
            stored = np.sort(rows[rows >= 0])
            if len(stored) != n or not np.array_equal(stored, np.arange(s.row_start, s.row_start + n)):
                problems.append(Problem(s.name, f"images.parquet maps {len(stored)} images to rows, commit says {n} rows from {s.row_start}"))
            if table.num_rows != c.get("n_images_seen", table.num_rows):
                problems.append(Problem(s.name, f"images.parquet has {table.num_rows} images, commit says {c.get('n_images_seen')}"))
        except Exception as exc:  # a damaged parquet file
            problems.append(Problem(s.name, f"images.parquet unreadable: {exc}"))
    moments_key = f"{layout.shard_moments_key(s.index)}/zarr.json"
    if moments_key not in files:
        problems.append(Problem(s.name, "statistics (moments) are missing"))
    elif c.get("stats_complete", True):
        for loc in store.locations:
            counts = c.get("moment_counts", {}).get(loc, {})
            if counts.get("cls") != n or counts.get("patches") != n * (store.n_tokens - 1):
                problems.append(Problem(s.name, f"{loc}: statistics count {counts}, expected {n} CLS and {n * (store.n_tokens - 1)} patch tokens"))
    return problems
