"""xarray views of a store: float32 for every stored dtype, committed rows only, lazily indexed.

`open_dataarray` wraps one array of a store (a location's main array or its CLS array) in an
xarray `BackendArray` whose reads go through `ActivationStore.fetch_chunk_into`, the same path
`read_rows` takes, and `encoding.to_float32`, the same decoding: values equal `read_rows`
exactly. fp8 stores: each chunk's codes and its chunk of the companion scale array
(`fetch_scales_into`) are read, the selection applied to both (the scales have no channel axis),
and the selected values decoded as `read_rows` does (`encoding.dequantize_fp8`: E4M3[code] * the
token's scale, one float32 multiplication), so fp8 views are float32 and equal `read_rows` bit for
bit too. Opening reads only metadata (the manifest, the array's zarr.json, and the image tables
when `image_keys`); indexing reads only the chunks that hold the selected images (fp8: and their
scale chunks), decoding only the selected values. No dask: `.load()`/`.values` read what is selected, in one thread.

Imported only by `ActivationStore.to_xarray` (xarray is an optional dependency), and never
imports activation_store.store.activation_store itself (no import cycle): the store is passed in.
"""

from __future__ import annotations

import numpy as np

try:
    import xarray as xr
    from xarray.backends import BackendArray
    from xarray.core import indexing
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ActivationStore.to_xarray needs xarray (pip install xarray); read_rows / read_cls need nothing more"
    ) from exc

from activation_store.errors import ConfigError
from activation_store.store import layout
from activation_store.store.encoding import E4M3_TABLE, SCALE_DTYPE, is_quantized, physical_dtype, to_float32

TOKENS = ("all", "cls")


def _row_bounds(rows) -> tuple[int, int | None]:
    """`rows` of `to_xarray` as read_rows' (start, stop): None, (start, stop), slice or range of array rows."""
    if rows is None:
        return 0, None
    if isinstance(rows, (slice, range)):
        if rows.step not in (None, 1):
            raise ConfigError(f"rows must be a contiguous range of array rows (step 1), got {rows!r}; "
                              f"take every n-th image with .isel(image=slice(None, None, n)) instead")
        start, stop = rows.start, rows.stop
    else:
        try:
            start, stop = rows
        except (TypeError, ValueError):
            raise ConfigError(f"rows must be None, (start, stop), a slice or a range of array rows, got {rows!r}") from None
    return int(start or 0), None if stop is None else int(stop)


class StoreBackendArray(BackendArray):
    """The committed rows `spans` of one store array, as a float32 array (images, *tail).

    Position i along the first axis is the i-th committed row of the spans, in store order (as
    `read_rows` concatenates them). Supports xarray's outer indexing: integers, positive-step slices
    and sorted integer arrays on each axis; each chunk holding a selected image is read once per
    indexing call, whatever the selection along the other axes."""

    def __init__(self, store, array_key: str, rows_per_chunk: int, tail: tuple[int, ...],
                 spans: list[tuple[int, int]]) -> None:
        self.store = store
        self.array_key = array_key
        self.rows_per_chunk = int(rows_per_chunk)
        self.tail = tuple(int(n) for n in tail)
        self.span_rows = np.array([a for a, _ in spans], dtype=np.int64)
        lengths = np.array([b - a for a, b in spans], dtype=np.int64)
        self.span_offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(spans) else lengths
        self.shape = (int(lengths.sum()), *self.tail)
        self.dtype = np.dtype(np.float32)
        self.storage_dtype = physical_dtype(store.dtype)
        self.quantized = is_quantized(store.dtype)  # fp8: codes here, one float32 scale per token beside them

    def rows_of(self, positions: np.ndarray) -> np.ndarray:
        """The array rows at image positions (sorted or not)."""
        span = np.searchsorted(self.span_offsets, positions, side="right") - 1
        return self.span_rows[span] + (positions - self.span_offsets[span])

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.OUTER, self._outer_read)

    def _outer_read(self, key: tuple) -> np.ndarray:
        first, rest = key[0], tuple(key[1:])
        n = self.shape[0]
        if isinstance(first, slice):
            positions = np.arange(*first.indices(n), dtype=np.int64)
        else:
            positions = np.asarray(first, dtype=np.int64).reshape(-1)  # an int, or a sorted int array
        if positions.size and (positions.min() < 0 or positions.max() >= n):
            raise IndexError(f"image index out of range for {n} images")
        tail_shape = []
        for k, size in zip(rest, self.tail, strict=True):
            if isinstance(k, slice):
                tail_shape.append(len(range(*k.indices(size))))
            elif not np.isscalar(k) and np.ndim(k):
                tail_shape.append(int(np.size(k)))
        out = np.empty((positions.size, *tail_shape), dtype=np.float32)
        if positions.size:
            self._fill(positions, rest, out)
        return out[0] if np.ndim(first) == 0 and not isinstance(first, slice) else out

    def _fill(self, positions: np.ndarray, rest: tuple, out: np.ndarray) -> None:
        per = self.rows_per_chunk
        rows = self.rows_of(positions)
        chunks = rows // per
        # positions come sorted (xarray's outer indexers are), so each chunk is one run of them
        breaks = np.flatnonzero(np.diff(chunks)) + 1
        buf = np.empty((per, *self.tail), dtype=self.storage_dtype)
        scale_buf = np.empty((per, *self.tail[:-1]), dtype=SCALE_DTYPE) if self.quantized else None
        whole_tail = all(isinstance(k, slice) and k == slice(None) for k in rest)
        for lo, hi in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [rows.size]]), strict=True):
            c = int(chunks[lo])
            self.store.fetch_chunk_into(self.array_key, c, buf)
            local = rows[lo:hi] - c * per
            if local[-1] - local[0] + 1 == local.size and (local.size == 1 or (np.diff(local) == 1).all()):
                pick = slice(int(local[0]), int(local[-1]) + 1)  # a view: no copy before decoding
            else:
                pick = local
            sub = _outer(buf[pick], rest, whole_tail)
            if scale_buf is None:
                to_float32(sub, self.store.dtype, out=out[lo:hi])
                continue
            self.store.fetch_scales_into(self.array_key, c, scale_buf)
            scales = _outer(scale_buf[pick], rest[:-1], whole_tail)  # the scales have no channel axis
            dst = out[lo:hi]
            np.take(E4M3_TABLE, sub, out=dst)
            # as encoding.dequantize_fp8 (read_rows): one float32 multiplication by the token's scale;
            # an integer channel index dropped the channel axis, else the scale is broadcast over it
            np.multiply(dst, scales if scales.ndim == dst.ndim else scales[..., None], out=dst)


def _outer(sub: np.ndarray, rest: tuple, whole: bool) -> np.ndarray:
    """Outer indexing of the axes after the first by `rest`, last axis first (integers drop axes)."""
    if not whole:
        for axis in reversed(range(len(rest))):
            sub = sub[(slice(None),) * (axis + 1) + (rest[axis],)]
    return sub


def _image_keys(store, rows: np.ndarray) -> np.ndarray:
    """The `key` of the image stored in each of `rows` (from the committed shards' image tables)."""
    table = store.images()
    t_rows = table["row"].to_numpy()
    order = np.argsort(t_rows, kind="stable")
    t_rows = t_rows[order]
    at = np.minimum(np.searchsorted(t_rows, rows), max(t_rows.size - 1, 0))
    found = t_rows[at] == rows if t_rows.size else np.zeros(rows.shape, dtype=bool)
    if not found.all():
        missing = rows[~found][:3].tolist()
        raise ConfigError(f"{store.url}: committed rows {missing} have no entry in their shard's image table; "
                          f"run `actstore verify {store.url}`")
    keys = np.asarray(table["key"].to_numpy(zero_copy_only=False), dtype=object)
    return keys[order][at]


def _variable(store, location, tokens: str, start: int, stop: int | None):
    loc = store.check_location(location)
    if tokens not in TOKENS:
        raise ConfigError(f"tokens must be 'all' (the main array) or 'cls' (the CLS array), got {tokens!r}; "
                          f"select tokens of the main array with .isel(token=...)")
    if tokens == "all":
        key, per, tail, dims = layout.array_key(loc), store.chunk_images, (store.n_tokens, store.d_model), \
            ("image", "token", "channel")
    else:
        key, per, tail, dims = layout.cls_array_key(loc), store.region_images, (store.d_model,), ("image", "channel")
    store._node(key)  # its metadata must be readable now (StoreFormatError naming it), not at the first read
    spans = store._resolve_rows(start, stop)
    backend = StoreBackendArray(store, key, per, tail, spans)
    attrs = {
        "location": loc,
        "tokens": tokens,
        "stored_dtype": store.dtype,
        "physical_dtype": str(physical_dtype(store.dtype)),
        "codec": store.codec.preset,
        "lossy": bool(store.codec.lossy),
        "model": dict(store.attrs.get("model") or {}),
        "store": store.url,
        "array": key,
        "format_version": str(store.attrs.get("format_version")),
    }
    if store.quantized:  # fp8: the per-token scales live in a companion array
        attrs["scale_array"] = layout.scale_array_key(key)
        attrs["lossy"] = True
    if store.codec.lossy or store.quantized:
        attrs["error_bound"] = store.codec.error_bound()
    return xr.Variable(dims, indexing.LazilyIndexedArray(backend), attrs=attrs), spans


def _coords(store, spans, tokens: str, image_keys: bool) -> dict:
    rows = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in spans]) if spans else np.zeros(0, np.int64)
    coords: dict = {"row": ("image", rows)}
    if tokens == "all":
        coords["token"] = ("token", np.arange(store.n_tokens, dtype=np.int64))
    else:
        coords["token"] = int(store.attrs.get("cls_token_index", 0))  # a scalar: as .isel(token=0) leaves
    if image_keys:
        coords["key"] = ("image", _image_keys(store, rows))
    return coords


def open_dataarray(store, location, tokens: str = "all", rows=None, image_keys: bool = False) -> xr.DataArray:
    """See `ActivationStore.to_xarray`."""
    start, stop = _row_bounds(rows)
    var, spans = _variable(store, location, tokens, start, stop)
    name = var.attrs["location"]
    # through a Dataset: DataArray(variable) would load the data, a Dataset keeps the variable lazy
    return xr.Dataset({name: var}, coords=_coords(store, spans, tokens, image_keys))[name]


def open_dataset(store, locations=None, tokens: str = "all", rows=None, image_keys: bool = False) -> xr.Dataset:
    """See `ActivationStore.to_xarray_dataset`."""
    start, stop = _row_bounds(rows)
    names = store.locations if locations is None else [store.check_location(loc) for loc in locations]
    variables, spans = {}, []
    for loc in names:
        variables[loc], spans = _variable(store, loc, tokens, start, stop)
    attrs = {k: variables[names[0]].attrs[k] for k in ("tokens", "stored_dtype", "physical_dtype", "codec", "lossy",
                                                        "model", "store", "format_version")} if names else {}
    return xr.Dataset(variables, coords=_coords(store, spans, tokens, image_keys), attrs=attrs)
