"""`info` and `verify`: what a store holds, and whether every byte of it is what was written."""

from __future__ import annotations

import bisect
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import zarr
from crc32c import crc32c
from tqdm import tqdm

from activation_store.store import layout
from activation_store.store.activation_store import ActivationStore, ShardInfo
from activation_store.store.chunk_io import CRC_BYTES, crc_matches
from activation_store.store.encoding import SCALE_DTYPE, physical_dtype
from activation_store.store.images import from_parquet_bytes
from activation_store.store.storage import is_temporary

STATES = (layout.PLANNED, layout.WRITING, layout.COMMITTED)


def _chunk_index(key: str, array_key: str) -> int | None:
    """Axis-0 chunk index of an object key of `array_key`, or None for its metadata (or a key that
    names no chunk)."""
    prefix = f"{array_key}/c/"
    if not key.startswith(prefix):
        return None
    try:
        return int(key[len(prefix):].split("/")[0])
    except ValueError:
        return None


class _Regions:
    """The planned regions of the arrays: which shard's region holds a row."""

    def __init__(self, shards: list[ShardInfo]) -> None:
        self._shards = sorted(shards, key=lambda s: s.row_start)
        self._starts = [s.row_start for s in self._shards]

    def owner(self, row: int) -> ShardInfo | None:
        i = bisect.bisect_right(self._starts, row) - 1
        if i >= 0 and row < self._shards[i].row_start + self._shards[i].region_rows:
            return self._shards[i]
        return None


@dataclass
class _ArrayObjects:
    """Sizes of the chunk objects of one array, split by the state of the shard owning them."""

    committed: dict[str, int] = field(default_factory=dict)
    pending: dict[str, int] = field(default_factory=dict)
    orphan: dict[str, int] = field(default_factory=dict)


def _classify(regions: _Regions, files: dict[str, int], array_key: str, rows_per_chunk: int) -> _ArrayObjects:
    out = _ArrayObjects()
    for key, size in files.items():
        c = _chunk_index(key, array_key)
        if c is None:
            continue
        owner = regions.owner(c * rows_per_chunk)
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
    by_state = dict.fromkeys(STATES, 0)
    by_status: dict[str, int] = {}
    for s in shards:
        by_state[s.state] = by_state.get(s.state, 0) + 1
        for k, v in s.commit.get("by_status", {}).items() if s.committed else ():
            by_status[k] = by_status.get(k, 0) + v
    files = store.storage.list_files("")
    regions = _Regions(shards)
    n_images = store.n_images
    locations = {}
    for loc in store.locations:
        main = _classify(regions, files, layout.array_key(loc), store.chunk_images)
        cls_objs = _classify(regions, files, layout.cls_array_key(loc), store.region_images)
        if store.quantized:  # fp8: the scales are part of what a value costs
            for objs, key, per in ((main, layout.array_key(loc), store.chunk_images),
                                   (cls_objs, layout.cls_array_key(loc), store.region_images)):
                scales = _classify(regions, files, layout.scale_array_key(key), per)
                for part in ("committed", "pending", "orphan"):
                    getattr(objs, part).update(getattr(scales, part))
        main_bytes = sum(main.committed.values())
        values = n_images * store.n_tokens * store.d_model
        entry = {
            "committed_chunks": len(main.committed) // (2 if store.quantized else 1),
            "pending_chunks": len(main.pending) // (2 if store.quantized else 1),
            "bytes_on_disk": sum(main.committed.values()) + sum(main.pending.values()) + sum(main.orphan.values()),
            "cls_bytes_on_disk": sum(cls_objs.committed.values()) + sum(cls_objs.pending.values()),
            "bytes_per_value": (main_bytes / values) if values else None,
            "compression_ratio": (values * physical_dtype(store.dtype).itemsize / main_bytes)
            if main_bytes
            else None,
        }
        if n_images and all(s.commit.get("stats_complete", True) for s in store.committed_shards()):
            entry["stats"] = {g: m.summary() for g, m in store.stats_by_group(loc).items()}
        if store.lossy:
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
        "shards": {"total": len(shards), **by_state},  # input shards per state, and all of them
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
        (f"model      {model.get('name', '-')} / {model.get('pretrained', '-')}, preprocessing "
         f"{model.get('preprocess', 'open_clip')}") if model else "model      -",
        f"layout     {d['n_tokens']} tokens x d_model {d['d_model']}, {d['dtype']}, "
        f"{d['chunk_images']} images per chunk, regions of {d['region_images']} images",
        f"codec      {codec['preset']}" + (f" (zstd level {codec['zstd_level']})" if "zstd" in codec["preset"] else "")
        + (f", keepbits {codec['keepbits']}, error bound {codec['error_bound']}" if codec.get("keepbits") else ""),
        f"images     {d['images']:,} committed ({d['tokens']:,} tokens per location); capacity {d['capacity_images']:,}",
        f"shards     {d['shards']['total']} input shards: "
        + ", ".join(f"{d['shards'].get(k, 0)} {k}" for k in STATES),
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
            what = "fp8 quantisation error" if d["dtype"] == "fp8" else "lossy error"
            lines.append(f"{'':<10} {what}: max rel {le['max_rel']:.3g}, relative RMSE {le['relative_rmse']:.3g}, max abs "
                         f"{le['max_abs']:.3g}" + ("" if le.get("complete", True) else " (not measured for every shard)"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- verify
@dataclass
class Problem:
    where: str  # an object key, a shard name, "shards" or "store"
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass
class Pending:
    """An input shard in state `writing`: a writer is at work, or one died. Not a problem: its
    objects are invisible to readers, and the next writer of the shard deletes and rewrites them."""

    shard: str
    source: str
    chunks: int  # chunk objects found in its region and statistics

    @property
    def where(self) -> str:
        return self.shard

    @property
    def what(self) -> str:
        return f"being written or was interrupted: {self.chunks} chunks will be rewritten by the next harvest run"

    def __str__(self) -> str:
        return f"shard {self.shard} ({self.source}) is {self.what}"


class VerifyReport(list):
    """What `verify` found: a list of the problems (empty, so false, when every committed object is
    sound), plus `pending`, the work the next harvest run redoes (never a problem), and the
    committed shards and images verify read from the shard groups."""

    def __init__(self, problems=(), pending=(), shards=()) -> None:
        super().__init__(problems)
        self.pending: list[Pending] = list(pending)
        committed = [s for s in shards if s.committed]
        self.committed_shards = len(committed)
        self.images = sum(s.n_rows for s in committed)

    @property
    def problems(self) -> list[Problem]:
        return list(self)

    def to_json(self) -> dict:
        """`actstore verify --json`."""
        return {
            "ok": not self,
            "problems": [{"where": p.where, "what": p.what} for p in self],
            "pending": [{"where": p.where, "what": p.what} for p in self.pending],
        }


def format_verify(url: str, report: VerifyReport) -> str:
    """`actstore verify`'s text: the problems, or OK; then the work left to the next harvest run."""
    if report:
        lines = [f"{len(report)} problem(s) in {url}:", *(f"  {p}" for p in report)]
    else:
        lines = [f"{url}: OK ({report.committed_shards} committed shards, {report.images:,} images, "
                 f"every checksum valid)"]
    if report.pending:
        lines.append(f"{len(report.pending)} input shard(s) not committed (not a problem):")
        lines += [f"  {p}" for p in report.pending]
    return "\n".join(lines)


def _crc_ok(data: bytes) -> bool:
    """Zarr's crc32c codec appends the little-endian crc32c of the preceding bytes."""
    return len(data) >= CRC_BYTES and crc_matches(memoryview(data)[:-CRC_BYTES], data[-CRC_BYTES:])


def _guarded(where: str, check, *args) -> list[Problem]:
    """The problems `check(*args)` returns; a failure of the check itself (damage nobody foresaw)
    becomes a problem too: verify reports damage, it never stops at it."""
    try:
        return check(*args)
    except Exception as exc:  # noqa: BLE001 - any damage must end up in the report
        return [Problem(where, f"could not be checked: {type(exc).__name__}: {exc}")]


def _read_json(store: ActivationStore, key: str) -> tuple[dict | None, str | None]:
    """(document, None) for a readable JSON object at `key`, else (None, what is wrong with it)."""
    try:
        data = store.storage.read_bytes(key)
    except Exception as exc:  # noqa: BLE001 - a directory in its place, permissions, the network
        return None, f"unreadable ({type(exc).__name__}: {exc})"
    if data is None:
        return None, "missing"
    try:
        doc = json.loads(data)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        return None, f"not valid JSON ({exc})"
    if not isinstance(doc, dict) or doc.get("zarr_format") != 3:
        return None, "not Zarr v3 metadata (no \"zarr_format\": 3)"
    return doc, None


def _check_node(store: ActivationStore, path: str, node_type: str, what: str, problems: list[Problem]) -> dict | None:
    """The metadata document of the group or array at `path`, or None after adding the problem."""
    key = f"{path}/zarr.json" if path else "zarr.json"
    doc, err = _read_json(store, key)
    if err is None and doc.get("node_type") != node_type:
        err = f"node_type is {doc.get('node_type')!r}, not {node_type!r}"
    if err is None and node_type == "array":
        try:  # what every reader does first: zarr must accept the metadata
            zarr.open_array(store.storage.zarr_store(), path=path, mode="r")
        except Exception as exc:  # noqa: BLE001 - zarr raises many types for invalid metadata
            err = f"not valid array metadata ({type(exc).__name__}: {exc})"
    if err is not None:
        problems.append(Problem(key, f"{err}: the metadata of {what}; readers cannot open it"))
        return None
    return doc


def _verify_metadata(store: ActivationStore, problems: list[Problem]) -> int | None:
    """Check the store's fixed metadata objects (root, cls and shards groups, every location's main
    and CLS array); returns the arrays' row capacity (None when no array is readable)."""
    root = _check_node(store, "", "group", "the store's root group", problems)
    if root is not None:
        a = (root.get("attributes") or {}).get(layout.ROOT_ATTR)
        if not isinstance(a, dict) or "format_version" not in a:
            problems.append(Problem("zarr.json", f"has no '{layout.ROOT_ATTR}' attributes with a format_version"))
    _check_node(store, layout.CLS_GROUP, "group", "the cls group", problems)
    _check_node(store, layout.SHARDS_GROUP, "group", "the shards group (the manifest)", problems)
    t, d, dtype = store.n_tokens, store.d_model, np.dtype(physical_dtype(store.dtype))
    capacities: dict[str, int] = {}
    for loc in store.locations:
        arrays = [
            (layout.array_key(loc), (t, d), store.chunk_images, f"the main array of {loc}", dtype),
            (layout.cls_array_key(loc), (d,), store.region_images, f"the CLS array of {loc}", dtype),
        ]
        if store.quantized:  # fp8: every array's companion of per-token scales
            arrays += [(layout.scale_array_key(key), tail[:-1], per, f"the scales of {what[4:]}", np.dtype(SCALE_DTYPE))
                       for key, tail, per, what, _ in arrays]
        for key, tail, per, what, want_dtype in arrays:
            doc = _check_node(store, key, "array", what, problems)
            if doc is None:
                continue
            shape = tuple(doc["shape"])
            chunks = tuple(doc["chunk_grid"]["configuration"]["chunk_shape"])
            if shape[1:] != tail or chunks != (per, *tail) or doc["data_type"] != want_dtype.name:
                problems.append(Problem(f"{key}/zarr.json", (
                    f"{what} has shape {shape}, chunks {chunks} and dtype {doc['data_type']}; the root attributes "
                    f"say (rows{''.join(', ' + str(n) for n in tail)}), chunks {(per, *tail)} and {want_dtype.name}")))
            capacities[key] = shape[0]
    if len(set(capacities.values())) > 1:
        first = next(iter(capacities))
        for key, n in capacities.items():
            if n != capacities[first]:
                problems.append(Problem(f"{key}/zarr.json", (
                    f"the array holds {n} rows, {first} holds {capacities[first]}: every array must cover "
                    f"every planned region (an interrupted planning step?)")))
    return min(capacities.values()) if capacities else None


def _read_shards(store: ActivationStore, files: dict[str, int], problems: list[Problem]) -> list[ShardInfo]:
    """The shards whose group metadata is readable, read from storage (not from zarr, which skips a
    folder without metadata in silence); a folder with objects but no readable metadata, a missing
    index and a damaged record are problems."""
    prefix = layout.SHARDS_GROUP + "/"
    folders: dict[str, int] = {}
    leftovers: dict[str, int] = {}  # temporaries of an atomic write that a kill interrupted
    for key in files:
        if key.startswith(prefix):
            name, sep, _ = key[len(prefix):].partition("/")
            if sep:  # an object inside a shard folder
                folders[name] = folders.get(name, 0) + 1
                leftovers[name] = leftovers.get(name, 0) + is_temporary(key)
    shards: list[ShardInfo] = []
    for name, n_objects in sorted(folders.items()):
        key = f"{prefix}{name}/zarr.json"
        if leftovers[name] == n_objects and key not in files:
            continue  # planning was killed before this group's record landed: nothing of it is data

        doc, err = _read_json(store, key)
        if err is None:
            try:
                if doc.get("node_type") != "group":
                    raise ValueError(f"node_type is {doc.get('node_type')!r}, not 'group'")
                s = ShardInfo.from_attrs(doc["attributes"][layout.SHARD_ATTR])
            except Exception as exc:  # noqa: BLE001 - any damage of the record
                err = f"holds no valid '{layout.SHARD_ATTR}' attributes ({type(exc).__name__}: {exc})"
        if err is not None:
            problems.append(Problem(key, (
                f"{err}: shard folder {prefix}{name} holds {n_objects} object(s) but no readable group metadata, "
                f"so its state, region and commit record are lost and readers do not see its images")))
            continue
        if s.name != name:
            problems.append(Problem(key, f"the record says it is shard {s.name}, but it lies in folder {name}"))
        if s.state not in STATES:
            problems.append(Problem(s.name, f"unknown state {s.state!r} (one of {', '.join(STATES)})"))
        if s.committed and not isinstance(s.commit.get("n_rows"), int):
            problems.append(Problem(s.name, f"committed, but its commit record has no row count: {s.commit}"))
        shards.append(s)
    seen = {s.index for s in shards}
    for i in range(max(seen, default=-1)):
        if i not in seen and layout.shard_name(i) not in folders:
            problems.append(Problem(f"{layout.shard_group_key(i)}/zarr.json", (
                f"missing: shards are numbered up to {layout.shard_name(max(seen))}, but shard group "
                f"{layout.shard_name(i)} is absent")))
    sources: dict[str, str] = {}
    for s in sorted(shards, key=lambda s: s.index):
        if s.source in sources:
            problems.append(Problem(s.name, f"source {s.source!r} is also the source of {sources[s.source]}"))
        sources.setdefault(s.source, s.name)
    return sorted(shards, key=lambda s: s.index)


def _verify_regions(store: ActivationStore, shards: list[ShardInfo], capacity: int | None) -> list[Problem]:
    """Regions are aligned, do not overlap, and tile the arrays' rows from 0 (planning places each
    after every region before it): rows in no region belong to a shard group that was lost."""
    problems = []
    spans = sorted((s.row_start, s.row_start + s.region_rows, s.name) for s in shards)
    for (a0, a1, an), (b0, _b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            problems.append(Problem(bn, f"region overlaps {an} ({b0} < {a1})"))
    for s in shards:
        if s.row_start % store.region_images or s.region_rows % store.region_images:
            problems.append(Problem(s.name, "region not aligned to region_images"))
        if capacity is not None and s.row_start + s.region_rows > capacity:
            problems.append(Problem(s.name, f"region ends at {s.row_start + s.region_rows}, beyond the arrays ({capacity})"))
    gaps, end = [], 0
    for a0, a1, _ in spans:
        if a0 > end:
            gaps.append((end, a0, "a shard group's zarr.json"))
        end = max(end, a1)
    if capacity is not None and capacity > end:  # the last shards: nothing else of theirs may be left
        nxt = layout.shard_group_key(max((s.index for s in shards), default=-1) + 1)
        gaps.append((end, capacity, f"{nxt}/zarr.json, or a later one,"))
    for a, b, lost in gaps:
        problems.append(Problem(layout.SHARDS_GROUP, (
            f"unaccounted: rows {a}-{b - 1} of the arrays lie in no planned shard's region; no shard group "
            f"accounts for them (was {lost} lost?)")))
    return problems


def _verify_shard(store: ActivationStore, s: ShardInfo, files: dict[str, int]) -> list[Problem]:
    problems = []
    c = s.commit
    n = s.n_rows
    if n > s.capacity or n < 0:
        problems.append(Problem(s.name, f"commit says {n} rows, but {s.capacity} were planned"))
    for loc in store.locations:
        arrays = [(layout.array_key(loc), store.chunk_images, 3, "chunks"),
                  (layout.cls_array_key(loc), store.region_images, 2, "cls_chunks")]
        if store.quantized:  # fp8: a chunk of scales beside every chunk of codes
            arrays += [(layout.scale_array_key(key), per, ndim - 1, written) for key, per, ndim, written in arrays]
        for array_key, per, ndim, written in arrays:
            indices = range(s.row_start // per, -(-s.row_stop // per))
            if written in c and c[written] != len(indices):
                problems.append(Problem(s.name, f"commit says {c[written]} {written} per array, its {n} rows need {len(indices)}"))
            for i in indices:
                key = layout.chunk_key(array_key, i, ndim)
                if key not in files:
                    problems.append(Problem(key, f"missing, but shard {s.name} ({s.source}) is committed with rows up to {s.row_start + n - 1}"))
    problems += _verify_images(store, s)
    problems += _verify_moments(store, s, files)
    return problems


def _verify_images(store: ActivationStore, s: ShardInfo) -> list[Problem]:
    c, n = s.commit, s.n_rows
    data = store.storage.read_bytes(layout.shard_images_key(s.index))
    if data is None:
        return [Problem(s.name, "images.parquet is missing")]
    expected = c.get("images_crc32c")  # format 1.1; a 1.0 commit has no checksum of the table
    if expected is not None and expected != crc32c(data):
        return [Problem(s.name, (
            f"images.parquet fails its checksum (crc32c {crc32c(data)}, the commit record says {expected}): "
            f"its bytes changed after the commit"))]
    try:
        table = from_parquet_bytes(data)
        rows = np.asarray(table["row"].to_numpy())
    except Exception as exc:  # noqa: BLE001 - a damaged parquet file
        return [Problem(s.name, f"images.parquet unreadable: {exc}")]
    problems = []
    stored = np.sort(rows[rows >= 0])
    if len(stored) != n or not np.array_equal(stored, np.arange(s.row_start, s.row_start + n)):
        problems.append(Problem(s.name, f"images.parquet maps {len(stored)} images to rows, commit says {n} rows from {s.row_start}"))
    if table.num_rows != c.get("n_images_seen", table.num_rows):
        problems.append(Problem(s.name, f"images.parquet has {table.num_rows} images, commit says {c.get('n_images_seen')}"))
    return problems


def _verify_moments(store: ActivationStore, s: ShardInfo, files: dict[str, int]) -> list[Problem]:
    """The statistics array's metadata, and one chunk per location. Zarr does not store a chunk
    equal to the fill value (0), so a location without counted tokens may lack its chunk; any other
    missing chunk would read as zeros and normalise training wrongly."""
    problems: list[Problem] = []
    c, n = s.commit, s.n_rows
    path = layout.shard_moments_key(s.index)
    doc = _check_node(store, path, "array", f"the statistics (moments) of shard {s.name} ({s.source})", problems)
    if doc is None:
        return problems
    want = (len(store.locations), len(layout.MOMENT_GROUPS), 3, store.d_model)
    if tuple(doc["shape"]) != want or tuple(doc["chunk_grid"]["configuration"]["chunk_shape"]) != (1, *want[1:]):
        problems.append(Problem(f"{path}/zarr.json", f"statistics of shard {s.name} have shape {tuple(doc['shape'])}, expected {want} in chunks of one location"))
        return problems
    counts = c.get("moment_counts") or {}
    for li, loc in enumerate(store.locations):
        loc_counts = counts.get(loc) or {}
        key = layout.chunk_key(path, li, 4)
        if key not in files and any(loc_counts.get(g) for g in layout.MOMENT_GROUPS):
            problems.append(Problem(key, (
                f"missing: the statistics of {loc} of shard {s.name} ({s.source}), committed with {loc_counts}; "
                f"they would read as zeros")))
        if c.get("stats_complete", True) and (loc_counts.get("cls") != n or loc_counts.get("patches") != n * (store.n_tokens - 1)):
            problems.append(Problem(s.name, f"{loc}: statistics count {loc_counts}, expected {n} CLS and {n * (store.n_tokens - 1)} patch tokens"))
    return problems


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted integers as [first, last] runs of consecutive ones."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return [(a, b) for a, b in runs]


def _stray_problems(store: ActivationStore, stray: dict[tuple[str, int | None], list[int]],
                    shards: dict[int, ShardInfo]) -> list[Problem]:
    """Chunks of the main and CLS arrays that no committed shard accounts for, one problem per run."""
    problems = []
    layouts = _array_layouts(store)
    for (array_key, owner), indices in sorted(stray.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else kv[0][1])):
        per, ndim = layouts[array_key]
        s = None if owner is None else shards[owner]
        for a, b in _runs(indices):
            where = layout.chunk_key(array_key, a, ndim) if a == b else f"{array_key}/c/{a}..{b}"
            rows = f"{b - a + 1} chunk object(s) holding rows {a * per}-{(b + 1) * per - 1}"
            if s is None:
                what = (f"orphaned: {rows}, which lie in no planned shard's region; no shard group accounts for "
                        f"them (was a shard group's zarr.json lost?) and readers never see them")
            elif s.committed:
                what = (f"unaccounted: {rows}, in the region of shard {s.name} ({s.source}) beyond its "
                        f"{s.n_rows} committed rows; no commit accounts for them")
            else:
                what = (f"unaccounted: {rows}, in the region of shard {s.name} ({s.source}), which is {s.state}: "
                        f"no writer has started it, and the next one does not delete them")
            problems.append(Problem(where, what))
    return problems


def _array_layouts(store: ActivationStore) -> dict[str, tuple[int, int]]:
    """{array key: (rows per chunk, ndim)} of every main and CLS array."""
    out = {}
    for loc in store.locations:
        out[layout.array_key(loc)] = (store.chunk_images, 3)
        out[layout.cls_array_key(loc)] = (store.region_images, 2)
        if store.quantized:
            out[layout.scale_array_key(layout.array_key(loc))] = (store.chunk_images, 2)
            out[layout.scale_array_key(layout.cls_array_key(loc))] = (store.region_images, 1)
    return out


def verify(store: ActivationStore, workers: int = 8, progress: bool = True) -> VerifyReport:
    """Check every metadata object of the store's layout, every checksum, and every committed
    shard's chunks, statistics and image table; survive any damage and report it.

    Returns a VerifyReport: the list of problems (empty when every committed object is sound), with
    the uncommitted shards whose leftovers the next harvest run rewrites in `.pending`."""
    problems: list[Problem] = []
    files = store.storage.list_files("")
    capacity = None
    try:
        capacity = _verify_metadata(store, problems)
    except Exception as exc:  # noqa: BLE001
        problems.append(Problem("store", f"metadata could not be checked: {type(exc).__name__}: {exc}"))
    shards: list[ShardInfo] = []
    try:
        shards = _read_shards(store, files, problems)
    except Exception as exc:  # noqa: BLE001
        problems.append(Problem(layout.SHARDS_GROUP, f"shard groups could not be read: {type(exc).__name__}: {exc}"))
    problems += _guarded(layout.SHARDS_GROUP, _verify_regions, store, shards, capacity)
    for s in shards:
        if s.committed:
            problems += _guarded(s.name, _verify_shard, store, s, files)

    # every chunk object: committed ones have their checksum checked, uncommitted ones are pending
    # work, and any other lies where no commit accounts for it
    regions = _Regions(shards)
    layouts = _array_layouts(store)
    by_index = {s.index: s for s in shards}
    moments_of = {layout.shard_moments_key(s.index): s for s in shards}
    keys: list[str] = []
    pending = {s.index: 0 for s in shards if s.state == layout.WRITING}
    stray: dict[tuple[str, int | None], list[int]] = {}
    for key in files:
        array_key, sep, _ = key.partition("/c/")
        if not sep:
            continue
        if array_key in layouts:  # a main or CLS array: owned by the shard whose region holds its rows
            per, ndim = layouts[array_key]
            c = _chunk_index(key, array_key)
            if c is None or key != layout.chunk_key(array_key, c, ndim):
                problems.append(Problem(key, "an object among the array's chunks that is no chunk of the store's layout"))
                continue
            owner = regions.owner(c * per)
            if owner is None or (owner.state != layout.WRITING and not (owner.committed and c * per < owner.row_stop)):
                stray.setdefault((array_key, None if owner is None else owner.index), []).append(c)
                continue
        else:  # a shard's statistics, or an array the store does not know: its checksum still counts
            owner = moments_of.get(array_key)
        if owner is not None and owner.state == layout.WRITING:
            pending[owner.index] += 1
        else:
            keys.append(key)
    problems += _stray_problems(store, stray, by_index)

    def check(key: str) -> Problem | None:
        try:
            data = store.storage.read_bytes(key)
        except Exception as exc:  # noqa: BLE001 - a directory in its place, permissions, the network
            return Problem(key, f"unreadable ({type(exc).__name__}: {exc})")
        if data is None:
            return Problem(key, "listed but unreadable")
        if not _crc_ok(data):
            return Problem(_describe_chunk(store, key, regions), "crc32c checksum mismatch (the chunk's bytes changed after writing)")
        return None

    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(check, keys)
        for p in tqdm(results, total=len(keys), desc="checksums", unit="chunk", disable=not progress):
            if p is not None:
                problems.append(p)
    todo = [Pending(by_index[i].name, by_index[i].source, n) for i, n in sorted(pending.items())]
    return VerifyReport(problems, todo, shards)


def _describe_chunk(store: ActivationStore, key: str, regions: _Regions) -> str:
    for array_key, (rows, _ndim) in _array_layouts(store).items():
        c = _chunk_index(key, array_key)
        if c is not None:
            owner = regions.owner(c * rows)
            shard = f"shard {owner.name} ({owner.source}, {owner.state})" if owner else "no shard"
            return f"{key} (rows {c * rows}-{(c + 1) * rows - 1}, {shard})"
    return key
