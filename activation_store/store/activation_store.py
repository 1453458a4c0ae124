"""Open, create and read an activation store (format v1, see docs/format.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import zarr

from activation_store import __version__
from activation_store.errors import (
    ChunkCorruptError,
    ChunkMissingError,
    ConfigError,
    ShardStateError,
    StoreExistsError,
    StoreFormatError,
    StoreNotFoundError,
    StoreVersionError,
)
from activation_store.store import layout
from activation_store.store.chunk_io import ChunkCodec
from activation_store.store.config import StoreConfig
from activation_store.store.encoding import CodecSpec, fill_value, physical_dtype, to_float32
from activation_store.store.images import SCHEMA as IMAGES_SCHEMA
from activation_store.store.images import from_parquet_bytes
from activation_store.store.locations import parse_locations
from activation_store.store.stats import Moments
from activation_store.store.storage import Storage


@dataclass
class ShardInfo:
    """One input shard's region of the arrays and its state (planned, writing, committed)."""

    index: int
    source: str
    row_start: int
    capacity: int  # images planned
    region_rows: int  # capacity rounded up to region_images
    state: str = layout.PLANNED
    commit: dict = field(default_factory=dict)  # filled on commit

    @property
    def name(self) -> str:
        return layout.shard_name(self.index)

    @property
    def committed(self) -> bool:
        return self.state == layout.COMMITTED

    @property
    def n_rows(self) -> int:
        return int(self.commit.get("n_rows", 0)) if self.committed else 0

    @property
    def row_stop(self) -> int:
        return self.row_start + self.n_rows

    def to_attrs(self) -> dict:
        return {
            "index": self.index,
            "source": self.source,
            "row_start": self.row_start,
            "capacity": self.capacity,
            "region_rows": self.region_rows,
            "state": self.state,
            "commit": self.commit,
        }

    @classmethod
    def from_attrs(cls, d: dict) -> ShardInfo:
        return cls(
            int(d["index"]), str(d["source"]), int(d["row_start"]), int(d["capacity"]),
            int(d["region_rows"]), str(d["state"]), dict(d.get("commit") or {}),
        )


@dataclass(frozen=True)
class ChunkRef:
    """A chunk of a location's main array: rows [row_start, row_stop) of it hold committed data."""

    index: int
    row_start: int
    row_stop: int
    shard: int

    @property
    def n_rows(self) -> int:
        return self.row_stop - self.row_start


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ActivationStore:
    """A store of ViT activations: one array (images, tokens, d_model) per hook location.

    Readers see only committed input shards; `refresh()` picks up shards committed since opening.
    """

    def __init__(self, storage: Storage, root_attrs: dict, group) -> None:
        self.storage = storage
        self.attrs = root_attrs
        self._group = group
        self.config = StoreConfig(**root_attrs["config"])
        self.codec: CodecSpec = self.config.codec_spec()
        self.locations: list[str] = list(root_attrs["locations"])
        self.n_tokens: int = int(root_attrs["n_tokens"])
        self.d_model: int = int(root_attrs["d_model"])
        self.dtype: str = self.config.dtype
        self.chunk_images = self.config.chunk_images
        self.region_images = self.config.region_images
        self._arrays: dict[str, zarr.Array] = {}
        self._codecs: dict[str, ChunkCodec | None] = {}
        self._shards: list[ShardInfo] | None = None

    # ---------------------------------------------------------------- create / open
    @classmethod
    def create(
        cls,
        url: str,
        *,
        locations,
        n_tokens: int,
        d_model: int,
        config: StoreConfig | None = None,
        model: dict | None = None,
        harvest_config: dict | None = None,
        storage_options: dict | None = None,
    ) -> ActivationStore:
        """Create an empty store (no images planned yet). One process does this, before any writer."""
        config = config or StoreConfig()
        locs = [str(loc) for loc in parse_locations(locations)]
        if n_tokens < 1 or d_model < 1:
            raise ConfigError(f"n_tokens and d_model must be positive, got {n_tokens}, {d_model}")
        storage = Storage(url, storage_options)
        if storage.exists("zarr.json"):
            raise StoreExistsError(f"{storage.url} already holds a Zarr group; open it, or pick a new path")
        codec = config.codec_spec()
        root_attrs = {
            "format_version": layout.FORMAT_VERSION,
            "software_version": __version__,
            "created_at": _now(),
            "model": model or {},
            "locations": locs,
            "n_tokens": int(n_tokens),
            "d_model": int(d_model),
            "dtype": config.dtype,
            "physical_dtype": str(physical_dtype(config.dtype)),
            "codec": codec.describe(),
            "codec_chain": [c.to_dict() for c in [codec.serializer(), *codec.compressors()]],
            "chunk_images": config.chunk_images,
            "region_images": config.region_images,
            "cls_token_index": 0,
            "config": config.to_dict(),
            "harvest_config": harvest_config or {},
        }
        group = zarr.open_group(storage.zarr_store(), mode="w", attributes={layout.ROOT_ATTR: root_attrs})
        group.create_group(layout.CLS_GROUP)
        group.create_group(layout.SHARDS_GROUP)
        array_config = {"write_empty_chunks": True}  # every written chunk exists: verify counts on it
        for loc in locs:
            for key, shape, chunks, tokens in (
                (layout.array_key(loc), (0, n_tokens, d_model), (config.chunk_images, n_tokens, d_model), "all"),
                (layout.cls_array_key(loc), (0, d_model), (config.region_images, d_model), "cls"),
            ):
                group.create_array(
                    key,
                    shape=shape,
                    chunks=chunks,
                    dtype=physical_dtype(config.dtype),
                    fill_value=fill_value(config.dtype),
                    serializer=codec.serializer(),
                    compressors=codec.compressors(),
                    config=array_config,
                    attributes={
                        layout.ARRAY_ATTR: {"location": loc, "tokens": tokens, "logical_dtype": config.dtype}
                    },
                    dimension_names=("image", "token", "channel") if tokens == "all" else ("image", "channel"),
                )
        return cls(storage, root_attrs, group)

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None, mode: str = "r") -> ActivationStore:
        storage = Storage(url, storage_options)
        if not storage.exists("zarr.json"):
            raise StoreNotFoundError(
                f"no activation store at {storage.url} (no zarr.json); check the path, or create one with a harvest"
            )
        try:
            group = zarr.open_group(storage.zarr_store(), mode="r" if mode == "r" else "r+")
        except Exception as exc:  # zarr raises several types for a broken zarr.json
            raise StoreFormatError(f"{storage.url}: cannot open as a Zarr v3 group ({exc})") from exc
        attrs = group.attrs.get(layout.ROOT_ATTR)
        if not isinstance(attrs, dict) or "format_version" not in attrs:
            raise StoreFormatError(
                f"{storage.url} is a Zarr group but not an activation store (no '{layout.ROOT_ATTR}' attributes)"
            )
        major = layout.format_major(attrs["format_version"])
        if major != layout.FORMAT_MAJOR:
            raise StoreVersionError(
                f"{storage.url} is activation-store format {attrs['format_version']}, but this software "
                f"(activation-store {__version__}) reads format {layout.FORMAT_MAJOR}.x only; "
                f"install a version of activation-store that supports format {major}.x"
            )
        return cls(storage, attrs, group)

    @property
    def url(self) -> str:
        return self.storage.url

    def __repr__(self) -> str:
        return f"ActivationStore({self.url!r}, locations={self.locations}, images={self.n_images})"

    # ---------------------------------------------------------------- arrays
    def _check_location(self, location) -> str:
        loc = str(location)
        if loc not in self.locations:
            raise ConfigError(f"{self.url} has no location {loc!r}; it has {', '.join(self.locations)}")
        return loc

    def array(self, location) -> zarr.Array:
        """The main zarr array (images, tokens, d_model) of a location, in storage dtype."""
        loc = self._check_location(location)
        if loc not in self._arrays:
            self._arrays[loc] = self._group[layout.array_key(loc)]
        return self._arrays[loc]

    def cls_array(self, location) -> zarr.Array:
        loc = self._check_location(location)
        key = layout.cls_array_key(loc)
        if key not in self._arrays:
            self._arrays[key] = self._group[key]
        return self._arrays[key]

    @property
    def capacity(self) -> int:
        """Rows allocated in the arrays (planned regions), committed or not."""
        return self.array(self.locations[0]).shape[0]

    # ---------------------------------------------------------------- shards
    def shards(self, refresh: bool = False) -> list[ShardInfo]:
        """Every planned input shard, in index order."""
        if self._shards is None or refresh:
            group = zarr.open_group(self.storage.zarr_store(), path=layout.SHARDS_GROUP, mode="r")
            found = []
            for _, sub in group.groups():
                d = sub.attrs.get(layout.SHARD_ATTR)
                if d is None:
                    raise StoreFormatError(f"{self.url}: shard group {sub.path} has no '{layout.SHARD_ATTR}' attributes")
                found.append(ShardInfo.from_attrs(d))
            self._shards = sorted(found, key=lambda s: s.index)
        return self._shards

    def refresh(self) -> ActivationStore:
        """See shards committed (and regions planned) since this store was opened."""
        self._shards = None
        self._arrays.clear()
        self._group = zarr.open_group(self.storage.zarr_store(), mode="r")
        return self

    def committed_shards(self) -> list[ShardInfo]:
        return [s for s in self.shards() if s.committed]

    def shard(self, key: int | str) -> ShardInfo:
        for s in self.shards():
            if s.index == key or s.source == key or s.name == key:
                return s
        raise ShardStateError(f"{self.url} has no planned input shard {key!r}")

    def plan_shards(self, shards: list[tuple[str, int]]) -> list[ShardInfo]:
        """Give each input shard `(source, max_images)` its own region of rows, aligned to
        `region_images`, after every region planned so far, and grow the arrays to hold them.

        Idempotent: a source planned before keeps its region (its capacity must not grow). Run it in
        one process, before the writers of these shards start (other writers may keep running).
        """
        existing = {s.source: s for s in self.shards(refresh=True)}
        next_index = max((s.index for s in existing.values()), default=-1) + 1
        next_row = max((s.row_start + s.region_rows for s in existing.values()), default=0)
        result, new = [], []
        for source, capacity in shards:
            source, capacity = str(source), int(capacity)
            if capacity < 1:
                raise ConfigError(f"input shard {source!r}: capacity must be >= 1, got {capacity}")
            if source in existing:
                old = existing[source]
                if capacity > old.capacity:
                    raise ShardStateError(
                        f"input shard {source!r} was planned for {old.capacity} images; it cannot grow to "
                        f"{capacity}. Give the extra images a new input shard name"
                    )
                result.append(old)
                continue
            region = -(-capacity // self.region_images) * self.region_images
            info = ShardInfo(next_index, source, next_row, capacity, region)
            existing[source] = info
            next_index += 1
            next_row += region
            result.append(info)
            new.append(info)
        if new:
            root = zarr.open_group(self.storage.zarr_store(), mode="r+")
            for info in new:
                root.create_group(layout.shard_group_key(info.index), attributes={layout.SHARD_ATTR: info.to_attrs()})
            for loc in self.locations:
                main, cls_arr = root[layout.array_key(loc)], root[layout.cls_array_key(loc)]
                if main.shape[0] < next_row:
                    main.resize((next_row, self.n_tokens, self.d_model))
                    cls_arr.resize((next_row, self.d_model))
            self.refresh()
        return result

    def writer(self, shard: int | str, **kwargs):
        """A writer for one planned input shard (see `ShardWriter`)."""
        from activation_store.store.writer import ShardWriter

        return ShardWriter(self, self.shard(shard), **kwargs)

    # ---------------------------------------------------------------- committed rows
    def row_ranges(self) -> list[tuple[int, int]]:
        """Committed rows as sorted [start, stop) ranges of array rows."""
        return [(s.row_start, s.row_stop) for s in self.committed_shards() if s.n_rows]

    @property
    def n_images(self) -> int:
        return sum(s.n_rows for s in self.committed_shards())

    @property
    def n_token_rows(self) -> int:
        return self.n_images * self.n_tokens

    def chunks(self) -> list[ChunkRef]:
        """Chunks of the main arrays holding committed rows, in store order (same for every location)."""
        out, ci = [], self.chunk_images
        for s in self.committed_shards():
            for start in range(s.row_start, s.row_stop, ci):
                out.append(ChunkRef(start // ci, start, min(start + ci, s.row_stop), s.index))
        return out

    def _check_committed(self, start: int, stop: int) -> None:
        for a, b in self.row_ranges():
            if a <= start and stop <= b:
                return
        raise ConfigError(
            f"rows [{start}, {stop}) of {self.url} are not all committed; committed ranges: {self.row_ranges()}"
        )

    # ---------------------------------------------------------------- reading
    def chunk_codec(self, array_key: str) -> ChunkCodec | None:
        """Our own decoder for an array's chunks, or None when its codec chain is not one of ours."""
        if array_key not in self._codecs:
            arr = self._group[array_key]
            try:
                self._codecs[array_key] = ChunkCodec([c.to_dict() for c in arr.metadata.codecs])
            except ValueError:
                self._codecs[array_key] = None
        return self._codecs[array_key]

    def fetch_chunk_into(self, array_key: str, index: int, out: np.ndarray, what: str | None = None) -> None:
        """Read whole chunk `index` (axis 0) of an array into `out` (its full chunk shape, storage dtype).

        Raises ChunkCorruptError / ChunkMissingError naming the chunk. Thread-safe: readers call it
        from many threads, each with its own `out`."""
        ndim = out.ndim
        key = layout.chunk_key(array_key, index, ndim)
        rows = out.shape[0]
        what = f"{self.url}: " + (what or f"chunk {key} (rows {index * rows}-{(index + 1) * rows - 1})")
        codec = self.chunk_codec(array_key)
        if codec is not None and codec.uncompressed and self.storage.is_local:
            codec.pread_uncompressed(self.storage.path(key), out, what)
            self.storage.count_read(out.nbytes + 4)
            return
        if codec is not None:
            data = self.storage.read_bytes(key)
            if data is None:
                raise ChunkMissingError(f"{what} is missing from storage; run `actstore verify {self.url}`")
            codec.decode_into(data, out, what)
            return
        if not self.storage.exists(key):  # zarr would silently return the fill value
            raise ChunkMissingError(f"{what} is missing from storage; run `actstore verify {self.url}`")
        try:
            out[...] = self._group[array_key][index * rows:(index + 1) * rows]
        except ValueError as exc:
            raise ChunkCorruptError(f"{what} is corrupt ({exc})") from exc

    def _read_span(self, array_key: str, rows_per_chunk: int, start: int, stop: int, tail: tuple, select) -> np.ndarray:
        """Rows [start, stop) of an array, chunk by chunk, through `fetch_chunk_into`."""
        buf = np.empty((rows_per_chunk, *tail), dtype=physical_dtype(self.dtype))
        parts = []
        for c in range(start // rows_per_chunk, (stop - 1) // rows_per_chunk + 1):
            self.fetch_chunk_into(array_key, c, buf)
            a, b = max(start, c * rows_per_chunk) - c * rows_per_chunk, min(stop, (c + 1) * rows_per_chunk) - c * rows_per_chunk
            parts.append(select(buf[a:b]).copy())
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def read_chunk(self, location, index: int, raw: bool = True) -> np.ndarray:
        """Committed rows of main-array chunk `index`: (rows, tokens, d_model), storage dtype unless raw=False."""
        loc = self._check_location(location)
        ref = self._chunk_ref(index)
        out = np.empty((self.chunk_images, self.n_tokens, self.d_model), dtype=physical_dtype(self.dtype))
        key = layout.chunk_key(layout.array_key(loc), index, 3)
        self.fetch_chunk_into(layout.array_key(loc), index, out,
                              f"chunk {key} (rows {ref.row_start}-{ref.row_stop - 1}, shard {layout.shard_name(ref.shard)})")
        out = out[: ref.n_rows]
        return out if raw else to_float32(out, self.dtype)

    def _chunk_ref(self, index: int) -> ChunkRef:
        start = index * self.chunk_images
        for s in self.committed_shards():
            if s.row_start <= start < s.row_stop:
                return ChunkRef(index, start, min(start + self.chunk_images, s.row_stop), s.index)
        raise ConfigError(f"chunk {index} of {self.url} holds no committed rows")

    def read_rows(self, location, start: int, stop: int, tokens: slice | None = None, raw: bool = False) -> np.ndarray:
        """Rows [start, stop) of a location (committed rows only), all or a range of tokens; float32
        unless raw=True."""
        loc = self._check_location(location)
        self._check_committed(start, stop)
        tok = tokens or slice(None)
        out = self._read_span(layout.array_key(loc), self.chunk_images, start, stop, (self.n_tokens, self.d_model),
                              lambda x: x[:, tok])
        return out if raw else to_float32(out, self.dtype)

    def read_cls(self, location, start: int = 0, stop: int | None = None, raw: bool = False) -> np.ndarray:
        """CLS tokens (rows, d_model) of committed rows [start, stop), from the small CLS array:
        reads none of the patch tokens."""
        loc = self._check_location(location)
        stop = self.capacity if stop is None else stop
        if stop <= start:
            return np.empty((0, self.d_model), dtype=physical_dtype(self.dtype) if raw else np.float32)
        self._check_committed(start, stop)
        out = self._read_span(layout.cls_array_key(loc), self.region_images, start, stop, (self.d_model,), lambda x: x)
        return out if raw else to_float32(out, self.dtype)

    def read_all_cls(self, location, raw: bool = False) -> np.ndarray:
        """Every committed CLS token, in store order."""
        parts = [self.read_cls(location, a, b, raw=raw) for a, b in self.row_ranges()]
        if not parts:
            return np.empty((0, self.d_model), dtype=np.float32)
        return np.concatenate(parts)

    # ---------------------------------------------------------------- metadata and statistics
    def images(self, include_dropped: bool = False) -> pa.Table:
        """Image metadata of committed shards (stored images only, unless include_dropped)."""
        tables = []
        for s in self.committed_shards():
            data = self.storage.read_bytes(layout.shard_images_key(s.index))
            if data is None:
                raise StoreFormatError(
                    f"{self.url}: committed shard {s.name} has no images.parquet; run `actstore verify`"
                )
            tables.append(from_parquet_bytes(data))
        table = pa.concat_tables(tables) if tables else IMAGES_SCHEMA.empty_table()
        if not include_dropped:
            table = table.filter(pa.compute.greater_equal(table["row"], 0))
        return table

    def shard_moments(self, shard: ShardInfo, location) -> dict[str, Moments]:
        loc = self._check_location(location)
        li = self.locations.index(loc)
        arr = zarr.open_array(self.storage.zarr_store(), path=layout.shard_moments_key(shard.index), mode="r")
        counts = shard.commit["moment_counts"][loc]
        block = np.asarray(arr[li])
        return {g: Moments.from_array(counts[g], block[gi]) for gi, g in enumerate(layout.MOMENT_GROUPS)}

    def stats_by_group(self, location) -> dict[str, Moments]:
        """Statistics of a location over committed shards for 'all', 'cls' and 'patches' tokens,
        each shard's moments read once and merged exactly in shard order."""
        totals = {g: Moments(self.d_model) for g in ("all", *layout.MOMENT_GROUPS)}
        for s in self.committed_shards():
            parts = self.shard_moments(s, location)
            for g in layout.MOMENT_GROUPS:
                totals[g].merge(parts[g])
                totals["all"].merge(parts[g])
        return totals

    def stats(self, location, tokens: str = "all") -> Moments:
        """Statistics of a location over committed shards; tokens: 'all', 'cls' or 'patches'."""
        if tokens not in ("all", *layout.MOMENT_GROUPS):
            raise ConfigError(f"tokens must be 'all', 'cls' or 'patches', got {tokens!r}")
        return self.stats_by_group(location)[tokens]

    def lossy_error(self, location) -> dict | None:
        """Measured rounding error of a lossy store over committed shards, with the bound it must meet."""
        if not self.codec.lossy:
            return None
        loc = self._check_location(location)
        max_abs = max_rel = sq_err = sq_val = 0.0
        for s in self.committed_shards():
            e = s.commit.get("lossy_error", {}).get(loc)
            if e:
                max_abs, max_rel = max(max_abs, e["max_abs"]), max(max_rel, e["max_rel"])
                sq_err, sq_val = sq_err + e["sum_sq_err"], sq_val + e["sum_sq"]
        return {
            "max_abs": max_abs,
            "max_rel": max_rel,
            "relative_rmse": float(np.sqrt(sq_err / sq_val)) if sq_val else 0.0,
            "bound": self.codec.error_bound(),
        }


def open_store(url: str, storage_options: dict | None = None) -> ActivationStore:
    """Open an existing store for reading (and writing shards)."""
    return ActivationStore.open(url, storage_options)
