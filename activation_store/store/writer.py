"""Writing one input shard: whole chunks into the shard's own region, then a commit.

Protocol (docs/format.md, "Writing"): the shard's state goes planned -> writing -> committed. A
writer that finds the state `writing` knows an earlier attempt died, and deletes every object that
attempt may have left in the region before writing again, so a rerun produces the same bytes as an
uninterrupted run. Only the commit (one atomic rewrite of the shard group's zarr.json, after every
chunk, the statistics and the image table are written) makes the rows visible to readers."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import numpy as np
import zarr

from activation_store.errors import CapacityError, ConfigError, NonFiniteActivationError, ShardStateError
from activation_store.store import layout
from activation_store.store.chunk_io import ChunkCodec
from activation_store.store.encoding import bitround, fill_value, nonfinite_rows, physical_dtype, to_float32, to_storage
from activation_store.store.images import OK, ImageRecord, to_parquet_bytes
from activation_store.store.stats import Moments


class _LossyError:
    """Accumulates the measured error of the writer's rounding against the values it was given."""

    def __init__(self) -> None:
        self.max_abs = self.max_rel = self.sum_sq_err = self.sum_sq = 0.0

    def add(self, given: np.ndarray, stored: np.ndarray) -> None:
        err = np.abs(stored - given)
        mag = np.abs(given)
        self.max_abs = max(self.max_abs, float(err.max(initial=0.0)))
        # relative error is meaningful for normal numbers only: mask the rest without fancy indexing
        rel = np.divide(err, mag, out=np.zeros_like(err), where=mag >= np.finfo(np.float16).tiny)
        self.max_rel = max(self.max_rel, float(rel.max(initial=0.0)))
        self.sum_sq_err += float(np.einsum("i,i->", err.ravel(), err.ravel(), dtype=np.float64))
        self.sum_sq += float(np.einsum("i,i->", given.ravel(), given.ravel(), dtype=np.float64))

    def to_dict(self) -> dict:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, "sum_sq_err": self.sum_sq_err, "sum_sq": self.sum_sq}


class ShardWriter:
    """Writes one planned input shard. Use as a context manager or call `commit()`.

    `add(activations, images)` takes `{location: array (B, n_tokens, d_model)}` (any float dtype,
    or uint16 bf16 bit patterns for a bf16 store) for B stored images plus their metadata;
    `add_dropped(images)` records images that were not stored (with their reason in `status`).
    """

    def __init__(self, store, shard, compute_stats: bool = True, check_finite: bool = True, threads: int | None = None) -> None:
        if shard.committed:
            raise ShardStateError(
                f"input shard {shard.source!r} ({shard.name}) of {store.url} is already committed; "
                f"readers may be using it, so it is never rewritten. Plan the images under a new shard name"
            )
        self.store = store
        self.shard = shard
        self.compute_stats = compute_stats
        self.check_finite = check_finite
        group = zarr.open_group(store.storage.zarr_store(), mode="r")
        self._codec = {}
        for loc in store.locations:
            for key in (layout.array_key(loc), layout.cls_array_key(loc)):
                self._codec[key] = ChunkCodec([c.to_dict() for c in group[key].metadata.codecs])
        end = shard.row_start + shard.region_rows
        if group[layout.array_key(store.locations[0])].shape[0] < end:
            raise ShardStateError(f"{store.url}: arrays do not cover the region of {shard.name}; re-run the planning step")
        if shard.state == layout.WRITING:
            self._clean_region()
        self._set_state(layout.WRITING)

        ci, ri, t, d = store.chunk_images, store.region_images, store.n_tokens, store.d_model
        pdt = physical_dtype(store.dtype)
        self._buf = {loc: np.full((ci, t, d), fill_value(store.dtype), dtype=pdt) for loc in store.locations}
        self._cls_buf = {loc: np.full((ri, d), fill_value(store.dtype), dtype=pdt) for loc in store.locations}
        self._fill = 0  # rows in the current chunk buffer
        self._cls_fill = 0
        self._next_row = shard.row_start
        self._chunks_written = 0
        self._batches_without_stats = 0
        self._cls_chunks_written = 0
        self._records: list[ImageRecord] = []
        self._rows: list[int] = []
        self._moments = {loc: {g: Moments(d) for g in layout.MOMENT_GROUPS} for loc in store.locations}
        self._lossy = {loc: _LossyError() for loc in store.locations} if store.codec.lossy else None
        # encoding and writing release the GIL: one thread per location keeps the cores busy
        n_threads = threads or min(len(store.locations), len(os.sched_getaffinity(0)) * 2)
        self._pool = ThreadPoolExecutor(n_threads) if n_threads > 1 else None
        self._closed = False

    # ------------------------------------------------------------------ state
    def _set_state(self, state: str, commit: dict | None = None) -> None:
        self.shard.state = state
        if commit is not None:
            self.shard.commit = commit
        doc = {
            "zarr_format": 3,
            "node_type": "group",
            "attributes": {layout.SHARD_ATTR: self.shard.to_attrs()},
        }
        self.store.storage.write_bytes(
            f"{layout.shard_group_key(self.shard.index)}/zarr.json", json.dumps(doc, indent=2).encode()
        )

    def _clean_region(self) -> None:
        s, st = self.shard, self.store
        keys = []
        for loc in st.locations:
            first, last = s.row_start // st.chunk_images, (s.row_start + s.region_rows) // st.chunk_images
            keys += [layout.chunk_key(layout.array_key(loc), c, 3) for c in range(first, last)]
            first, last = s.row_start // st.region_images, (s.row_start + s.region_rows) // st.region_images
            keys += [layout.chunk_key(layout.cls_array_key(loc), c, 2) for c in range(first, last)]
        keys.append(layout.shard_images_key(s.index))
        moments = layout.shard_moments_key(s.index)
        keys += [f"{moments}/zarr.json"] + [layout.chunk_key(moments, i, 4) for i in range(len(st.locations))]
        st.storage.delete(keys)

    # ------------------------------------------------------------------ adding
    @property
    def n_rows(self) -> int:
        return len([r for r in self._rows if r >= 0])

    def add(self, activations: Mapping[str, np.ndarray], images: Sequence[ImageRecord],
            moments: Mapping[str, Mapping[str, Moments]] | None = None) -> None:
        """Store B images. `moments` ({location: {"cls": Moments, "patches": Moments}} of exactly these
        stored values), when given, replaces the writer's own statistics (a harvest computes them on
        the GPU); give it for every call or for none."""
        self._check_open()
        st = self.store
        missing = set(st.locations) - {str(k) for k in activations}
        if missing:
            raise ConfigError(f"add() needs every location of the store; missing {sorted(missing)}")
        acts = {str(k): np.asarray(v) for k, v in activations.items() if str(k) in st.locations}
        b = len(images)
        for loc, x in acts.items():
            if x.shape != (b, st.n_tokens, st.d_model):
                raise ConfigError(
                    f"{loc}: expected activations of shape ({b}, {st.n_tokens}, {st.d_model}) for {b} images, got {x.shape}"
                )
        if any(r.status != OK for r in images):
            raise ConfigError("add() takes stored images only (status 'ok'); record the others with add_dropped()")
        if self.n_rows + b > self.shard.capacity:
            raise CapacityError(
                f"input shard {self.shard.source!r} was planned for {self.shard.capacity} images, "
                f"but {self.n_rows + b} were added; plan it with its true image count"
            )
        stored = {}
        for loc, x in acts.items():
            raw = to_storage(x, st.dtype)
            if st.codec.lossy:
                raw = bitround(np.array(raw, copy=True), st.dtype, st.codec.keepbits)
                self._lossy[loc].add(np.asarray(x, dtype=np.float32), to_float32(raw, st.dtype))
            bad = nonfinite_rows(raw, st.dtype) if self.check_finite else None
            if bad is not None:
                keys = [images[i].key for i in np.flatnonzero(bad)[:5]]
                raise NonFiniteActivationError(
                    f"{loc}: activations of images {keys} are NaN/inf in {st.dtype}; compute in a wider dtype, "
                    f"store as fp32, or drop these images with add_dropped()"
                )
            stored[loc] = raw
        ci, ri = st.chunk_images, st.region_images
        direct: list[tuple[str, int, np.ndarray, int]] = []  # whole chunks straight from this batch
        pos = 0
        while pos < b:
            if self._fill == 0 and b - pos >= ci:
                index = self.shard.row_start // ci + self._chunks_written
                direct += [(loc, index, stored[loc][pos:pos + ci], ci) for loc in st.locations]
                self._chunks_written += 1
                take = ci
            else:
                take = min(b - pos, ci - self._fill)
                for loc, raw in stored.items():
                    self._buf[loc][self._fill:self._fill + take] = raw[pos:pos + take]
                self._fill += take
                if self._fill == ci:
                    self._flush_chunk()  # before the staging buffer is refilled
            done = 0
            while done < take:  # CLS tokens go to their own, larger chunks
                n = min(take - done, ri - self._cls_fill)
                for loc, raw in stored.items():
                    self._cls_buf[loc][self._cls_fill:self._cls_fill + n] = raw[pos + done:pos + done + n, 0]
                self._cls_fill += n
                done += n
                if self._cls_fill == ri:
                    self._flush_cls()
            pos += take
        self._write_main(direct)
        if moments is None and not self.compute_stats:
            self._batches_without_stats += 1
        if moments is not None:
            if self.compute_stats:
                raise ConfigError("pass moments to add() only to a writer made with compute_stats=False")
            for loc in st.locations:
                for g in layout.MOMENT_GROUPS:
                    self._moments[loc][g].merge(moments[loc][g])
        for rec in images:
            self._records.append(rec)
            self._rows.append(self._next_row)
            self._next_row += 1

    def add_dropped(self, images: Sequence[ImageRecord]) -> None:
        self._check_open()
        for rec in images:
            if rec.status == OK:
                raise ConfigError(f"image {rec.key!r} was passed to add_dropped() with status 'ok'; give its reason")
            self._records.append(rec)
            self._rows.append(-1)

    def _map_locations(self, fn) -> None:
        if self._pool is None:
            for loc in self.store.locations:
                fn(loc)
        else:
            for _ in self._pool.map(fn, self.store.locations):
                pass

    def _write_chunk(self, array_key: str, index: int, buf: np.ndarray) -> None:
        self.store.storage.write_chunk(layout.chunk_key(array_key, index, buf.ndim), self._codec[array_key].encode(buf))

    def _write_main(self, items: list[tuple[str, int, np.ndarray, int]]) -> None:
        """Write whole main-array chunks (location, chunk index, data, valid rows) in parallel, with
        their statistics when the writer computes them."""
        st = self.store

        def write(item):
            loc, index, chunk, n = item
            self._write_chunk(layout.array_key(loc), index, chunk)
            if self.compute_stats:
                x = to_float32(chunk[:n], st.dtype)
                return Moments.of(x[:, 0]), Moments.of(x[:, 1:])
            return None

        if self._pool is None or len(items) < 2:
            results = [write(item) for item in items]
        else:
            results = list(self._pool.map(write, items))
        for (loc, *_), parts in zip(items, results):  # merged in a fixed order: reruns give equal bytes
            if parts is not None:
                self._moments[loc]["cls"].merge(parts[0])
                self._moments[loc]["patches"].merge(parts[1])

    def _flush_chunk(self) -> None:
        st, n = self.store, self._fill
        if n < st.chunk_images:
            for buf in self._buf.values():
                buf[n:] = fill_value(st.dtype)  # the padding of a shard's last chunk reads as NaN
        index = self.shard.row_start // st.chunk_images + self._chunks_written
        self._write_main([(loc, index, self._buf[loc], n) for loc in st.locations])
        self._chunks_written += 1
        self._fill = 0

    def _flush_cls(self) -> None:
        st, n = self.store, self._cls_fill
        index = self.shard.row_start // st.region_images + self._cls_chunks_written

        def flush(loc: str) -> None:
            buf = self._cls_buf[loc]
            if n < st.region_images:
                buf[n:] = fill_value(st.dtype)
            self._write_chunk(layout.cls_array_key(loc), index, buf)

        self._map_locations(flush)
        self._cls_chunks_written += 1
        self._cls_fill = 0

    # ------------------------------------------------------------------ commit
    def commit(self) -> dict:
        """Write what is buffered, the statistics and the image table, then make the shard visible."""
        self._check_open()
        st = self.store
        if self._fill:
            self._flush_chunk()
        if self._cls_fill:
            self._flush_cls()
        counts = {}
        block = np.zeros((len(st.locations), len(layout.MOMENT_GROUPS), 3, st.d_model))
        for li, loc in enumerate(st.locations):
            counts[loc] = {g: self._moments[loc][g].count for g in layout.MOMENT_GROUPS}
            for gi, g in enumerate(layout.MOMENT_GROUPS):
                block[li, gi] = self._moments[loc][g].to_array()
        moments = zarr.create_array(
            st.storage.zarr_store(),
            name=layout.shard_moments_key(self.shard.index),
            shape=block.shape,
            chunks=(1, *block.shape[1:]),
            dtype="float64",
            compressors=st.codec.compressors()[-1:],  # crc32c only
            overwrite=True,
        )
        moments[...] = block
        st.storage.write_bytes(layout.shard_images_key(self.shard.index), to_parquet_bytes(self._records, self._rows))
        by_status: dict[str, int] = {}
        for rec in self._records:
            by_status[rec.status] = by_status.get(rec.status, 0) + 1
        commit = {
            "n_rows": self.n_rows,
            "n_images_seen": len(self._records),
            "by_status": by_status,
            "chunks": self._chunks_written,
            "cls_chunks": self._cls_chunks_written,
            "moment_counts": counts,
            "stats_complete": self._batches_without_stats == 0,
            "committed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if self._lossy is not None:
            commit["lossy_error"] = {loc: e.to_dict() for loc, e in self._lossy.items()}
        self._set_state(layout.COMMITTED, commit)
        self._close()
        st.refresh()
        return commit

    def _close(self) -> None:
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown()

    def _check_open(self) -> None:
        if self._closed:
            raise ShardStateError(f"the writer of {self.shard.name} is closed (committed)")

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._closed:
            self.commit()
        elif not self._closed:
            self._close()
        # on error the shard stays in state `writing`: invisible, and cleaned by the next writer
