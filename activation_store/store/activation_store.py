"""Open, create and read an activation store (format v1, see docs/format.md)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import zarr
from crc32c import crc32c

from activation_store._version import __version__
from activation_store.errors import (
    ChunkCorruptError,
    ChunkMissingError,
    ConfigError,
    RowsNotCommittedError,
    ShardStateError,
    StoreExistsError,
    StoreFormatError,
    StoreNotEmptyError,
    StoreNotFoundError,
    UnknownLocationError,
)
from activation_store.faults import kill_point
from activation_store.store import layout
from activation_store.store.chunk_io import CRC_BYTES, ChunkCodec
from activation_store.store.config import StoreConfig
from activation_store.store.encoding import (
    FP8_ENCODING,
    SCALE_DTYPE,
    CodecSpec,
    array_encoding,
    dequantize_fp8,
    fill_value,
    is_quantized,
    physical_dtype,
    to_float32,
)
from activation_store.store.images import SCHEMA as IMAGES_SCHEMA
from activation_store.store.images import from_parquet_bytes
from activation_store.store.locations import parse_locations
from activation_store.store.nodes import (
    array_document,
    array_shape,
    group_document,
    grown_array_document,
    parse_document,
    read_document,
    shard_document,
)
from activation_store.store.stats import Moments
from activation_store.store.storage import Storage, is_temporary, temporary_target


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
    """Chunk `index` (along images) of array `array_key`, a location's main array or its CLS array.

    The chunk covers array rows [index * rows_per_chunk, (index + 1) * rows_per_chunk); of those,
    [row_start, row_stop) hold committed data of input shard `shard`, the rest is padding."""

    array_key: str
    index: int
    row_start: int
    row_stop: int
    rows_per_chunk: int
    shard: int

    @property
    def n_rows(self) -> int:
        return self.row_stop - self.row_start


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _creation_documents(root_attrs: dict, locs: list[str], n_tokens: int, d_model: int, config: StoreConfig,
                        codec: CodecSpec) -> dict[str, bytes]:
    """{key: zarr.json} of every object a store's creation writes, in order: the root last."""
    docs = {layout.node_key(layout.CLS_GROUP): group_document(), layout.node_key(layout.SHARDS_GROUP): group_document()}
    encoding = array_encoding(config.dtype)  # bf16 only: how readers without this package decode the uint16s
    quantized = is_quantized(config.dtype)
    if quantized:  # format 2.0: the per-token scales of every array, chunked as the array is
        encoding = FP8_ENCODING
        docs[layout.node_key(layout.SCALES_GROUP)] = group_document()
        docs[layout.node_key(layout.scale_array_key(layout.CLS_GROUP))] = group_document()
    for loc in locs:
        for key, shape, chunks, tokens in (
            (layout.array_key(loc), (0, n_tokens, d_model), (config.chunk_images, n_tokens, d_model), "all"),
            (layout.cls_array_key(loc), (0, d_model), (config.region_images, d_model), "cls"),
        ):
            docs[layout.node_key(key)] = array_document(
                shape=shape,
                chunks=chunks,
                dtype=physical_dtype(config.dtype),
                fill_value=fill_value(config.dtype),
                serializer=codec.serializer(),
                compressors=codec.compressors(),
                attributes={layout.ARRAY_ATTR: {"location": loc, "tokens": tokens, "logical_dtype": config.dtype,
                                                **({"encoding": encoding} if encoding else {}),
                                                **({"scales": layout.scale_array_key(key)} if quantized else {})}},
                dimension_names=("image", "token", "channel") if tokens == "all" else ("image", "channel"),
            )
            if quantized:
                docs[layout.node_key(layout.scale_array_key(key))] = array_document(
                    shape=shape[:-1], chunks=chunks[:-1], dtype=SCALE_DTYPE, fill_value=float("nan"),
                    serializer=codec.serializer(), compressors=codec.compressors(SCALE_DTYPE.itemsize),
                    attributes={layout.ARRAY_ATTR: {"location": loc, "tokens": tokens, "scales_of": key,
                                                    "logical_dtype": "float32"}},
                    dimension_names=("image", "token") if tokens == "all" else ("image",),
                )
    docs[layout.node_key("")] = group_document({layout.ROOT_ATTR: root_attrs})
    return docs


def _listing(names: list[str], limit: int = 3) -> str:
    return ", ".join(repr(n) for n in names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_creatable(storage: Storage, objects: list[str]) -> list[str]:
    """Refuse to create a store where anything is that a store's creation did not write; returns the
    objects an interrupted earlier creation listed (the caller's to replace), after deleting the
    temporaries of its atomic writes. Reads the top level first, so a home directory given by mistake
    is refused without walking it."""
    if storage.is_file(""):
        raise StoreExistsError(f"{storage.url} is a file, not a directory; pick a path for the new store")
    names = storage.list_dir("")
    if not names:
        return []
    if "zarr.json" in names:
        raise StoreExistsError(f"{storage.url} already holds a Zarr group; open it, or pick a new path")
    marker = layout.CREATING_MARKER in names
    earlier: list[str] = []
    if marker:
        try:
            earlier = [str(k) for k in json.loads(storage.read_bytes(layout.CREATING_MARKER, count=False))["objects"]]
        except (TypeError, ValueError, KeyError):
            earlier = []
    ours = {*objects, *earlier, layout.CREATING_MARKER}

    def foreign(key: str) -> bool:  # without the marker, only temporaries of its own first write are ours
        return not ((marker and key in ours) or (is_temporary(key) and temporary_target(key) in ours))

    tops = {k.split("/")[0] for k in ours}
    found = [n for n in names if n not in tops and foreign(n)]
    files: dict[str, int] = {}
    if not found:
        files = storage.list_files("")
        found = sorted(k for k in files if foreign(k))
    if found:
        half = " the remains of an interrupted store creation and" if marker else ""
        raise StoreNotEmptyError(
            f"{storage.url} is not empty and is not an activation store: it holds{half} {_listing(found)}, which a "
            f"store's creation did not write; nothing was changed. Create the store in a new or empty directory"
        )
    storage.delete([k for k in files if is_temporary(k)])
    return earlier


class ActivationStore:
    """A store of ViT activations: one array (images, tokens, d_model) per hook location.

    Readers see only committed input shards; `refresh()` picks up shards committed since opening.
    """

    def __init__(self, storage: Storage, root_attrs: dict, group) -> None:
        self.storage = storage
        self.attrs = root_attrs
        self._group = group
        self.config = StoreConfig.from_attrs(root_attrs["config"])
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
        """Create an empty store (no images planned yet). One process does this, before any writer.

        Never deletes what it did not write: a path that holds anything but an activation store whose
        creation was interrupted is refused (StoreNotEmptyError), an existing store too
        (StoreExistsError). A creation killed at any point is finished by the next one."""
        config = config or StoreConfig()
        locs = [str(loc) for loc in parse_locations(locations)]
        if n_tokens < 1 or d_model < 1:
            raise ConfigError(f"n_tokens and d_model must be positive, got {n_tokens}, {d_model}")
        storage = Storage(url, storage_options)
        codec = config.codec_spec()
        root_attrs = {
            "format_version": layout.format_version_for(config.dtype),
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
        docs = _creation_documents(root_attrs, locs, int(n_tokens), int(d_model), config, codec)
        earlier = _check_creatable(storage, list(docs))
        # Restartable from any point: a marker first (it lists every object creation writes, so a rerun
        # knows them for its own), the root zarr.json last, then the marker goes. A directory without the
        # root document is no store yet (open says so) and the next create finishes it.
        others = [k for k in earlier if k not in docs]  # written by an earlier attempt with other settings
        marker = {"created_at": root_attrs["created_at"], "software_version": __version__, "objects": [*docs, *others]}
        storage.write_bytes(layout.CREATING_MARKER, json.dumps(marker, indent=2).encode())
        kill_point("store_create")
        storage.delete(others)
        storage.remove_empty_folders(others)
        for key, data in docs.items():
            storage.write_bytes(key, data)
            kill_point("store_create")
        storage.delete([layout.CREATING_MARKER])
        return cls(storage, root_attrs, zarr.open_group(storage.zarr_store(), mode="r"))

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None, mode: str = "r") -> ActivationStore:
        storage = Storage(url, storage_options)
        if not storage.exists("zarr.json"):
            if storage.exists(layout.CREATING_MARKER):
                raise StoreNotFoundError(
                    f"{storage.url} is an activation store whose creation was interrupted (it has no root zarr.json "
                    f"yet); rerun the command that creates it (the harvest) to finish creating it"
                )
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
        layout.check_format_version(attrs["format_version"], storage.url, __version__)  # StoreVersionError
        try:
            return cls(storage, attrs, group)
        except (KeyError, TypeError, ValueError) as exc:  # ConfigError too: an invalid recorded config
            raise StoreFormatError(f"{storage.url}: the store's root attributes are incomplete or invalid ({exc!r})") from exc

    @property
    def url(self) -> str:
        return self.storage.url

    def __repr__(self) -> str:
        return f"ActivationStore({self.url!r}, locations={self.locations}, images={self.n_images})"

    # ---------------------------------------------------------------- arrays
    def check_location(self, location) -> str:
        """The store's name of `location` (a HookLocation, 'resid_22', ...); UnknownLocationError
        when the store has no such location."""
        loc = str(location)
        if loc not in self.locations:
            raise UnknownLocationError(f"{self.url} has no location {loc!r}; it has {', '.join(self.locations)}")
        return loc

    def _node(self, key: str) -> zarr.Array:
        """The zarr array at `key`; StoreFormatError naming its metadata when it is missing or damaged."""
        if key not in self._arrays:
            try:
                node = self._group[key]
            except Exception as exc:  # noqa: BLE001 - zarr raises KeyError, JSONDecodeError, ValueError, ...
                meta = layout.node_key(key)
                state = "damaged" if self.storage.exists(meta) else "missing"
                raise StoreFormatError(
                    f"{self.url}: {meta} (the metadata of array {key}) is {state} ({type(exc).__name__}: {exc}); "
                    f"run `actstore verify {self.url}` to list what else is damaged"
                ) from exc
            if not isinstance(node, zarr.Array):
                raise StoreFormatError(f"{self.url}: {layout.node_key(key)} is a group, not the array {key}")
            self._arrays[key] = node
        return self._arrays[key]

    def array(self, location) -> zarr.Array:
        """The main zarr array (images, tokens, d_model) of a location, in storage dtype."""
        return self._node(layout.array_key(self.check_location(location)))

    def cls_array(self, location) -> zarr.Array:
        return self._node(layout.cls_array_key(self.check_location(location)))

    @property
    def quantized(self) -> bool:
        """Whether values are stored as codes with a scale per token (fp8, format 2.0)."""
        return is_quantized(self.dtype)

    @property
    def lossy(self) -> bool:
        """Whether the stored values differ from those given to the writer (a lossy preset, or fp8)."""
        return self.codec.lossy or self.quantized

    def data_array_keys(self) -> list[str]:
        """The keys of every main and CLS array (not the scales)."""
        return [k for loc in self.locations for k in (layout.array_key(loc), layout.cls_array_key(loc))]

    def array_keys(self) -> list[str]:
        """The keys of every chunked array a shard writes: main and CLS arrays, and for fp8 their scales."""
        keys = self.data_array_keys()
        return keys + [layout.scale_array_key(k) for k in keys] if self.quantized else keys

    @property
    def capacity(self) -> int:
        """Rows allocated in the arrays (planned regions), committed or not."""
        return self.array(self.locations[0]).shape[0]

    # ---------------------------------------------------------------- shards
    def shards(self, refresh: bool = False) -> list[ShardInfo]:
        """Every planned input shard, in index order. Read from storage, so a shard folder whose
        metadata is missing or damaged is a StoreFormatError naming it, never skipped in silence."""
        if self._shards is None or refresh:
            names = [n for n in self.storage.list_dir(layout.SHARDS_GROUP) if layout.SHARD_DIR.fullmatch(n)]
            keys = {n: layout.node_key(f"{layout.SHARDS_GROUP}/{n}") for n in names}
            docs = self.storage.read_many(list(keys.values()))
            found = []
            for name, key in keys.items():
                if docs[key] is None:
                    self._check_unplanned(name)
                    continue
                found.append(self._parse_shard(name, key, docs[key]))
            self._shards = sorted(found, key=lambda s: s.index)
        return self._shards

    def _check_unplanned(self, name: str) -> None:
        """A shard folder without metadata is a planning step that died before writing it (nothing
        but our temporaries there); anything else means its record was lost."""
        prefix = f"{layout.SHARDS_GROUP}/{name}"
        others = sorted(k for k in self.storage.list_files(prefix) if not is_temporary(k))
        if others:
            raise StoreFormatError(
                f"{self.url}: {prefix}/zarr.json (the record of shard {name}: its state, region and commit) is missing, "
                f"but {prefix} holds {len(others)} object(s) ({others[0]}, ...); run `actstore verify {self.url}`"
            )

    def _parse_shard(self, name: str, key: str, data: bytes) -> ShardInfo:
        doc = parse_document(self.url, key, data, "group", f"shard {name}: its state, region and commit")
        try:
            info = ShardInfo.from_attrs(doc["attributes"][layout.SHARD_ATTR])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # absent (None) or damaged
            raise StoreFormatError(
                f"{self.url}: {key} has no valid '{layout.SHARD_ATTR}' attributes ({exc!r}); run `actstore verify {self.url}`"
            ) from exc
        if info.name != name:
            raise StoreFormatError(f"{self.url}: {key} holds the record of shard {info.name}, not of {name}")
        return info

    def read_shard(self, index: int) -> ShardInfo:
        """One shard's record as it is in storage now (not as this store saw it when listing)."""
        key = layout.node_key(layout.shard_group_key(index))
        data = self.storage.read_bytes(key, count=False)
        if data is None:
            raise StoreFormatError(f"{self.url}: {key} (the record of shard {layout.shard_name(index)}) is missing")
        return self._parse_shard(layout.shard_name(index), key, data)

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
        one process, before the writers of these shards start (other writers may keep running). Killed
        at any point, a rerun with the same shards gives the store an uninterrupted run gives.
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
        # Restartable from any point: the arrays grow first, so every shard group written covers rows that
        # exist; a planning step killed before its groups are written leaves the arrays longer than the
        # regions, and the rerun plans the same regions again. Arrays shorter than the planned regions
        # (a planner of format 1.0 killed after writing groups) grow here too.
        grown = False
        for key in self.array_keys():
            grown |= self._grow_array(key, next_row)
        for info in new:
            group = layout.shard_group_key(info.index)
            self.storage.clean_temporaries(group)
            self.storage.write_bytes(layout.node_key(group), shard_document(info.to_attrs()))
            kill_point("store_plan")
        if self.storage.exists(layout.CREATING_MARKER):  # a creation killed after its root zarr.json leaves it
            self.storage.delete([layout.CREATING_MARKER])
        if new or grown:
            self.refresh()
        return result

    def _grow_array(self, key: str, rows: int) -> bool:
        meta = layout.node_key(key)
        doc = read_document(self.storage, meta, "array", f"array {key}")
        if array_shape(doc, meta, self.url)[0] >= rows:
            return False
        self.storage.write_bytes(meta, grown_array_document(doc, rows))
        kill_point("store_plan")
        return True

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

    def _spans(self) -> list[tuple[int, int]]:
        """Committed rows as maximal [start, stop) ranges: shards with no row between them merge."""
        spans: list[list[int]] = []
        for a, b in self.row_ranges():
            if spans and spans[-1][1] == a:
                spans[-1][1] = b
            else:
                spans.append([a, b])
        return [(a, b) for a, b in spans]

    def chunk_refs(self, location, cls: bool = False, shards: Iterable[int] | None = None) -> list[ChunkRef]:
        """Every chunk holding committed rows of a location's main array (of its CLS array when
        `cls`), in store order; only chunks of the input shards with the given indices when `shards`
        is given. Chunks never straddle two shards, so each ref belongs to exactly one."""
        loc = self.check_location(location)
        key, per = (layout.cls_array_key(loc), self.region_images) if cls else (layout.array_key(loc), self.chunk_images)
        wanted = None if shards is None else {int(i) for i in shards}
        return [
            ChunkRef(key, start // per, start, min(start + per, s.row_stop), per, s.index)
            for s in self.committed_shards() if wanted is None or s.index in wanted
            for start in range(s.row_start, s.row_stop, per)
        ]

    def _resolve_rows(self, start: int, stop: int | None) -> list[tuple[int, int]]:
        """The row ranges a read of [start, stop) returns, concatenated (see `read_rows`)."""
        if start < 0 or (stop is not None and stop < 0):
            raise ConfigError(f"row numbers are array rows, >= 0; got start={start}, stop={stop}")
        if stop is None:
            return [(max(a, start), b) for a, b in self._spans() if b > start]
        if stop <= start:
            return []
        if not any(a <= start and stop <= b for a, b in self._spans()):
            raise RowsNotCommittedError(
                f"rows [{start}, {stop}) of {self.url} are not all committed; committed ranges: {self.row_ranges()} "
                f"(rows between them are region padding or belong to uncommitted shards). Leave stop=None to read "
                f"every committed row"
            )
        return [(start, stop)]

    # ---------------------------------------------------------------- reading
    def chunk_codec(self, array_key: str) -> ChunkCodec | None:
        """Our own decoder for an array's chunks, or None when its codec chain is not one of ours."""
        if array_key not in self._codecs:
            arr = self._node(array_key)
            try:
                self._codecs[array_key] = ChunkCodec([c.to_dict() for c in arr.metadata.codecs])
            except StoreFormatError:  # not one of our presets: zarr decodes it
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
            self.storage.count_read(out.nbytes + CRC_BYTES)
            return
        if codec is not None:
            data = self.storage.read_bytes(key, buffer=True)
            if data is None:
                raise ChunkMissingError(f"{what} is missing from storage; run `actstore verify {self.url}`")
            codec.decode_into(data, out, what)
            return
        if not self.storage.exists(key):  # zarr would silently return the fill value
            raise ChunkMissingError(f"{what} is missing from storage; run `actstore verify {self.url}`")
        try:
            out[...] = self._node(array_key)[index * rows:(index + 1) * rows]
        except ValueError as exc:
            raise ChunkCorruptError(f"{what} is corrupt ({exc})") from exc

    def _read(self, array_key: str, rows_per_chunk: int, start: int, stop: int | None, tail: tuple, select,
              raw: bool) -> np.ndarray:
        """The rows `_resolve_rows(start, stop)` of an array, chunk by chunk through
        `fetch_chunk_into`, `select`ed and concatenated; float32 unless raw."""
        buf = np.empty((rows_per_chunk, *tail), dtype=physical_dtype(self.dtype))
        scales = np.empty((rows_per_chunk, *tail[:-1]), dtype=SCALE_DTYPE) if self.quantized else None
        parts, scale_parts = [], []
        for a, b in self._resolve_rows(start, stop):
            for c in range(a // rows_per_chunk, (b - 1) // rows_per_chunk + 1):
                self.fetch_chunk_into(array_key, c, buf)
                first = c * rows_per_chunk
                rows = slice(max(a, first) - first, min(b, first + rows_per_chunk) - first)
                parts.append(select(buf[rows]).copy())
                if scales is not None:
                    self.fetch_chunk_into(layout.scale_array_key(array_key), c, scales)
                    scale_parts.append(select(scales[rows][..., None])[..., 0].copy())
        out = self._joined(parts, select(buf[:0]))
        if raw:
            return out
        if scales is not None:
            return dequantize_fp8(out, self._joined(scale_parts, select(scales[:0][..., None])[..., 0]))
        return to_float32(out, self.dtype)

    @staticmethod
    def _joined(parts: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else empty.copy()

    def fetch_scales_into(self, array_key: str, index: int, out: np.ndarray, what: str | None = None) -> None:
        """fp8 stores: chunk `index` of the scales of an array (main: (rows, n_tokens), CLS: (rows,))
        into float32 `out`, as `fetch_chunk_into` reads the codes."""
        self.fetch_chunk_into(layout.scale_array_key(array_key), index, out, what)

    def read_chunk(self, location, index: int, raw: bool = False) -> np.ndarray:
        """Committed rows of main-array chunk `index`: (rows, tokens, d_model), float32 unless raw=True
        (then the storage dtype; bf16 as its uint16 bit patterns)."""
        ref = next((r for r in self.chunk_refs(location) if r.index == index), None)
        if ref is None:
            raise RowsNotCommittedError(
                f"chunk {index} of {self.url} holds no committed rows; list those that do with chunk_refs()"
            )
        out = np.empty((ref.rows_per_chunk, self.n_tokens, self.d_model), dtype=physical_dtype(self.dtype))
        key = layout.chunk_key(ref.array_key, index, out.ndim)
        self.fetch_chunk_into(ref.array_key, index, out,
                              f"chunk {key} (rows {ref.row_start}-{ref.row_stop - 1}, shard {layout.shard_name(ref.shard)})")
        out = out[: ref.n_rows]
        if raw:
            return out
        if self.quantized:
            scales = np.empty((ref.rows_per_chunk, self.n_tokens), dtype=SCALE_DTYPE)
            self.fetch_scales_into(ref.array_key, index, scales)
            return dequantize_fp8(out, scales[: ref.n_rows])
        return to_float32(out, self.dtype)

    def read_rows(self, location, start: int = 0, stop: int | None = None, tokens: slice | None = None,
                  raw: bool = False) -> np.ndarray:
        """Images (rows, tokens, d_model) of a location, all tokens or the slice `tokens`; float32
        unless raw=True (then the storage dtype; bf16 as its uint16 bit patterns, fp8 as its e4m3 codes,
        whose scales `read_scales` gives).

        Rows are array rows (the `row` column of `images()`). With `stop` given: exactly rows
        [start, stop), every one of which must be committed (the range may run across input shards
        with no padding or uncommitted rows between them), else RowsNotCommittedError. With
        stop=None: every committed row from `start` on, in store order, concatenated across shards
        (the padding of their regions skipped); by default that is every committed row."""
        loc = self.check_location(location)
        tok = tokens or slice(None)
        return self._read(layout.array_key(loc), self.chunk_images, start, stop, (self.n_tokens, self.d_model),
                          lambda x: x[:, tok], raw)

    def read_scales(self, location, start: int = 0, stop: int | None = None, cls: bool = False) -> np.ndarray:
        """fp8 stores: the float32 scale of each token of the rows `read_rows` (`read_cls` when cls)
        returns: (rows, n_tokens), or (rows,) for CLS."""
        loc = self.check_location(location)
        if not self.quantized:
            raise ConfigError(f"{self.url} stores {self.dtype}, which has no scales (only fp8 stores have)")
        key, per, tail = ((layout.cls_array_key(loc), self.region_images, ()) if cls else
                          (layout.array_key(loc), self.chunk_images, (self.n_tokens,)))
        buf = np.empty((per, *tail), dtype=SCALE_DTYPE)
        parts = []
        for a, b in self._resolve_rows(start, stop):
            for c in range(a // per, (b - 1) // per + 1):
                self.fetch_scales_into(key, c, buf)
                first = c * per
                parts.append(buf[max(a, first) - first:min(b, first + per) - first].copy())
        return self._joined(parts, buf[:0])

    def read_cls(self, location, start: int = 0, stop: int | None = None, raw: bool = False) -> np.ndarray:
        """CLS tokens (rows, d_model) of the rows `read_rows` would return for the same `start` and
        `stop`, from the small CLS array: reads none of the patch tokens. float32 unless raw=True."""
        loc = self.check_location(location)
        return self._read(layout.cls_array_key(loc), self.region_images, start, stop, (self.d_model,), lambda x: x, raw)

    def to_xarray(self, location, tokens: str = "all", rows=None, image_keys: bool = False):
        """A location's activations as a lazily indexed float32 `xarray.DataArray` (needs xarray).

        tokens='all': the main array, dims (image, token, channel); tokens='cls': the CLS array, dims
        (image, channel), with the scalar coordinate token=0. The `image` axis holds the committed rows
        `read_rows(location, *rows)` returns (every committed row when rows is None; else rows =
        (start, stop) or slice(start, stop) of array rows, as read_rows takes them), in store order, and
        its values equal read_rows' (read_cls' for 'cls') exactly, for every storage dtype and codec.
        Coordinates: `row` (the array row of each image, the `row` column of `images()`), `token`, and
        `key` (each image's key from the image tables) when image_keys=True, which reads every committed
        shard's images.parquet. Attributes: location, tokens, stored_dtype, physical_dtype, codec, model, ...

        Opening reads metadata only; indexing (`.isel`, `.values`, `.load()`) reads just the chunks that
        hold the selected images, through `fetch_chunk_into` (checksums checked). No dask. The view is of
        the rows committed when it was made (committed shards never change); make a new one after
        `refresh()` to see shards committed since. See docs/format.md, "Reading with xarray"."""
        from activation_store.store.xarray_view import open_dataarray

        return open_dataarray(self, location, tokens=tokens, rows=rows, image_keys=image_keys)

    def to_xarray_dataset(self, locations=None, tokens: str = "all", rows=None, image_keys: bool = False):
        """Every location (or those given) as one lazily indexed `xarray.Dataset` of `to_xarray`
        DataArrays sharing their coordinates."""
        from activation_store.store.xarray_view import open_dataset

        return open_dataset(self, locations, tokens=tokens, rows=rows, image_keys=image_keys)

    # ---------------------------------------------------------------- metadata and statistics
    def images(self, include_dropped: bool = False) -> pa.Table:
        """Image metadata of committed shards (stored images only, unless include_dropped). Each
        shard's table is checked against the checksum of its commit record (format 1.1)."""
        tables = [self._shard_images(s) for s in self.committed_shards()]
        table = pa.concat_tables(tables) if tables else IMAGES_SCHEMA.empty_table()
        if not include_dropped:
            table = table.filter(pa.compute.greater_equal(table["row"], 0))
        return table

    def _shard_images(self, s: ShardInfo) -> pa.Table:
        key = layout.shard_images_key(s.index)
        data = self.storage.read_bytes(key)
        if data is None:
            raise StoreFormatError(f"{self.url}: committed shard {s.name} has no images.parquet; run `actstore verify`")
        expected = s.commit.get("images_crc32c")  # absent from a 1.0 commit: nothing to check against
        if expected is not None and crc32c(data) != expected:
            raise ChunkCorruptError(
                f"{self.url}: {key} (the image table of shard {s.name}, {s.source}) fails its checksum (crc32c "
                f"{crc32c(data)}, its commit record says {expected}): its bytes changed after the commit; run "
                f"`actstore verify {self.url}`"
            )
        try:
            return from_parquet_bytes(data)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise ChunkCorruptError(
                f"{self.url}: {key} (the image table of shard {s.name}) is not a readable parquet file ({exc}); "
                f"run `actstore verify {self.url}`"
            ) from exc

    def shard_moments(self, shard: ShardInfo, location) -> dict[str, Moments]:
        loc = self.check_location(location)
        li = self.locations.index(loc)
        counts = shard.commit["moment_counts"][loc]
        block = self._moments_block(shard, li)
        return {g: Moments.from_array(counts[g], block[gi]) for gi, g in enumerate(layout.MOMENT_GROUPS)}

    def _moments_block(self, shard: ShardInfo, li: int) -> np.ndarray:
        """Location `li`'s (2, 3, d_model) statistics of a committed shard, checksum checked."""
        path = layout.shard_moments_key(shard.index)
        meta = layout.node_key(path)
        doc = read_document(self.storage, meta, "array", f"the statistics of shard {shard.name}")
        want = [len(self.locations), len(layout.MOMENT_GROUPS), 3, self.d_model]
        chunks = doc.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
        if array_shape(doc, meta, self.url) != want or chunks != [1, *want[1:]] or doc.get("data_type") != "float64":
            raise StoreFormatError(
                f"{self.url}: {meta} describes statistics of shape {doc.get('shape')}, chunks {chunks}, "
                f"{doc.get('data_type')}; expected {want}, chunks {[1, *want[1:]]}, float64"
            )
        out = np.zeros((1, *want[1:]), dtype=np.float64)
        key = layout.chunk_key(path, li, 4)
        try:
            codec = ChunkCodec(doc["codecs"])
        except (StoreFormatError, KeyError, TypeError):  # not our chain: zarr decodes it
            codec = None
        data = self.storage.read_bytes(key, count=False)
        if data is None:
            if "moments_chunks" in shard.commit:  # format 1.1 writes every chunk; 1.0's zarr skipped zero ones
                raise ChunkMissingError(
                    f"{self.url}: {key} (the statistics of {self.locations[li]} of shard {shard.name}) is missing from "
                    f"storage; run `actstore verify {self.url}`"
                )
            return out[0]
        what = f"{self.url}: {key} (the statistics of {self.locations[li]} of shard {shard.name})"
        if codec is not None:
            codec.decode_into(data, out, what)
            return out[0]
        try:
            return np.asarray(zarr.open_array(self.storage.zarr_store(), path=path, mode="r")[li])
        except Exception as exc:  # noqa: BLE001
            raise ChunkCorruptError(f"{what} is corrupt ({type(exc).__name__}: {exc})") from exc

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
        """Measured error of a lossy store (lossy preset or fp8) over committed shards, with the
        bound it must meet. `complete` is false when a shard's writer got values it could not measure
        (codes quantised elsewhere, with no error passed along)."""
        if not self.lossy:
            return None
        loc = self.check_location(location)
        max_abs = max_rel = sq_err = sq_val = 0.0
        complete = True
        for s in self.committed_shards():
            e = s.commit.get("lossy_error", {}).get(loc)
            complete &= bool(e) and s.commit.get("lossy_error_complete", True)
            if e:
                max_abs, max_rel = max(max_abs, e["max_abs"]), max(max_rel, e["max_rel"])
                sq_err, sq_val = sq_err + e["sum_sq_err"], sq_val + e["sum_sq"]
        return {
            "max_abs": max_abs,
            "max_rel": max_rel,
            "relative_rmse": float(np.sqrt(sq_err / sq_val)) if sq_val else 0.0,
            "bound": self.codec.error_bound(),
            "complete": complete,
        }


def open_store(url: str, storage_options: dict | None = None) -> ActivationStore:
    """Open an existing store for reading (and writing shards)."""
    return ActivationStore.open(url, storage_options)
