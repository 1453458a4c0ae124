"""Writing one input shard: whole chunks into the shard's own region, then a commit.

Protocol (docs/format.md, "Writing"): a writer first claims the shard (store/claims.py: one writer
per shard at a time; a claim whose holder died is taken over). The shard's state goes planned ->
writing -> committed. A writer that finds the state `writing` knows an earlier attempt died, and
deletes every object that attempt may have left in the region (and the temporaries of its atomic
writes in the shard's group) before writing again, so a rerun produces the same bytes as an
uninterrupted run. Only the commit (one atomic rewrite of the shard group's zarr.json, after every
chunk, the statistics and the image table are written) makes the rows visible to readers."""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from dataclasses import dataclass

import numpy as np
from crc32c import crc32c

from activation_store.errors import (
    CapacityError,
    ConfigError,
    NonFiniteActivationError,
    ShardStateError,
    StoreFormatError,
)
from activation_store.store import layout
from activation_store.store.chunk_io import ChunkCodec
from activation_store.store.claims import DEFAULT_CLAIM_TIMEOUT_S, ShardClaim
from activation_store.store.encoding import (
    SCALE_DTYPE,
    bitround,
    dequantize_fp8,
    fill_value,
    nonfinite_rows,
    nonfinite_tokens,
    physical_dtype,
    quantize_fp8,
    to_float32,
    to_storage,
)
from activation_store.store.images import OK, ImageRecord, to_parquet_bytes
from activation_store.store.nodes import array_document, array_shape, read_document, shard_document
from activation_store.store.stats import Moments


@dataclass(frozen=True)
class Quantized:
    """Activations already quantised to fp8 (by `harvest.quantize.quantize_fp8` on the device, or
    read from another fp8 store): codes uint8 (B, n_tokens, d_model) and scales float32 (B, n_tokens).
    `ShardWriter.add` of an fp8 store takes them in place of float activations."""

    codes: np.ndarray
    scales: np.ndarray


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

    def merge(self, e: Mapping) -> None:
        """Add an error measured elsewhere (the same four figures)."""
        self.max_abs, self.max_rel = max(self.max_abs, float(e["max_abs"])), max(self.max_rel, float(e["max_rel"]))
        self.sum_sq_err += float(e["sum_sq_err"])
        self.sum_sq += float(e["sum_sq"])

    def to_dict(self) -> dict:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, "sum_sq_err": self.sum_sq_err, "sum_sq": self.sum_sq}


class PendingWrites:
    """The chunk writes of one `ShardWriter.add(wait=False)`: `wait()` returns once they have landed,
    or raises the first that failed (and the writer stops: nothing of the shard is committed)."""

    def __init__(self, writer: ShardWriter, futures: list) -> None:
        self._writer, self._futures = writer, futures

    def wait(self) -> None:
        futures, self._futures = self._futures, []
        error = None
        for f in futures:  # every one, so that no write is still running when this returns
            try:
                f.result()
            except BaseException as exc:  # noqa: BLE001 - the first is raised below
                error = error or exc
        if error is not None:
            if not self._writer._closed:
                self._writer._abort(error)
            raise error


class ShardWriter:
    """Writes one planned input shard. Use as a context manager or call `commit()`.

    `add(activations, images)` takes `{location: array (B, n_tokens, d_model)}` (any float dtype,
    or uint16 bf16 bit patterns for a bf16 store, or `Quantized` codes and scales for an fp8 store)
    for B stored images plus their metadata;
    `add_dropped(images)` records images that were not stored (with their reason in `status`).

    The writer holds the shard's claim from its start to its commit, or to `close()` (which a `with`
    block calls after an error, and which runs when an unclosed writer is dropped): a second writer of
    the same shard meanwhile gets ShardClaimedError. `claim_timeout_s`: how long a claim of this
    writer stays valid without a refresh (it refreshes while writing), as judged from other hosts.
    """

    def __init__(self, store, shard, compute_stats: bool = True, check_finite: bool = True, threads: int | None = None,
                 claim_timeout_s: float = DEFAULT_CLAIM_TIMEOUT_S) -> None:
        self._closed = True  # until the writer has started
        self._pool = None
        if shard.committed:
            raise self._already_committed(store, shard)
        self.store = store
        self.shard = shard
        self.compute_stats = compute_stats
        self.check_finite = check_finite
        self._claim = ShardClaim(store.storage, shard, claim_timeout_s)
        self._claim.acquire()  # ShardClaimedError while another writer holds the shard
        self._release = weakref.finalize(self, self._claim.release)  # also when dropped unclosed
        try:
            self._start()
        except BaseException:
            self._release()
            raise

        ci, ri, t, d = store.chunk_images, store.region_images, store.n_tokens, store.d_model
        pdt = physical_dtype(store.dtype)
        self._buf = {loc: np.full((ci, t, d), fill_value(store.dtype), dtype=pdt) for loc in store.locations}
        self._cls_buf = {loc: np.full((ri, d), fill_value(store.dtype), dtype=pdt) for loc in store.locations}
        # fp8: the scales of the staged rows, written beside their codes (NaN padding, as the codes')
        self._quantized = store.quantized
        self._sbuf = {loc: np.full((ci, t), np.nan, SCALE_DTYPE) for loc in store.locations} if self._quantized else {}
        self._cls_sbuf = {loc: np.full((ri,), np.nan, SCALE_DTYPE) for loc in store.locations} if self._quantized else {}
        self._fill = 0  # rows in the current chunk buffer
        self._cls_fill = 0
        self._next_row = shard.row_start
        self._chunks_written = 0
        self._batches_without_stats = 0
        self._cls_chunks_written = 0
        self._records: list[ImageRecord] = []
        self._rows: list[int] = []
        self._moments = {loc: {g: Moments(d) for g in layout.MOMENT_GROUPS} for loc in store.locations}
        self._lossy = {loc: _LossyError() for loc in store.locations} if store.lossy else None
        self._lossy_complete = True  # false once codes arrive without their measured error
        # encoding and writing release the GIL: one thread per location keeps the cores busy
        n_threads = threads or min(len(store.locations), len(os.sched_getaffinity(0)) * 2)
        self._pool = ThreadPoolExecutor(n_threads) if n_threads > 1 else None
        self._failed: str | None = None  # the type of the error that stopped the writer
        self._in_flight: list[PendingWrites] = []  # batches queued by add(wait=False)
        self._closed = False

    @staticmethod
    def _already_committed(store, shard) -> ShardStateError:
        return ShardStateError(
            f"input shard {shard.source!r} ({shard.name}) of {store.url} is already committed; "
            f"readers may be using it, so it is never rewritten. Plan the images under a new shard name"
        )

    def _start(self) -> None:
        """With the claim held: the shard's record as it is now, the clean-up of an earlier attempt,
        then the state `writing`."""
        store, shard = self.store, self.shard
        now = store.read_shard(shard.index)  # another writer may have committed it since `store` listed it
        if now.committed:
            raise self._already_committed(store, now)
        shard.state, shard.commit = now.state, now.commit
        store.storage.clean_temporaries(layout.shard_group_key(shard.index))  # of an atomic write killed midway
        self._codec = {}
        end = shard.row_start + shard.region_rows
        for key in store.array_keys():
            codec = store.chunk_codec(key)
            if codec is None:
                raise StoreFormatError(f"{store.url}: array {key} has a codec chain this writer does not write")
            self._codec[key] = codec
            meta = layout.node_key(key)
            if array_shape(read_document(store.storage, meta, "array", f"array {key}"), meta, store.url)[0] < end:
                raise ShardStateError(f"{store.url}: arrays do not cover the region of {shard.name}; re-run the planning step")
        if shard.state == layout.WRITING:
            self._clean_region()
        self._set_state(layout.WRITING)

    # ------------------------------------------------------------------ state
    def _set_state(self, state: str, commit: dict | None = None) -> None:
        self.shard.state = state
        if commit is not None:
            self.shard.commit = commit
        self.store.storage.write_bytes(layout.node_key(layout.shard_group_key(self.shard.index)),
                                       shard_document(self.shard.to_attrs()))

    def _clean_region(self) -> None:
        s, st = self.shard, self.store
        keys = []
        for loc in st.locations:
            first, last = s.row_start // st.chunk_images, (s.row_start + s.region_rows) // st.chunk_images
            keys += [layout.chunk_key(layout.array_key(loc), c, 3) for c in range(first, last)]
            if st.quantized:
                keys += [layout.chunk_key(layout.scale_array_key(layout.array_key(loc)), c, 2) for c in range(first, last)]
            first, last = s.row_start // st.region_images, (s.row_start + s.region_rows) // st.region_images
            keys += [layout.chunk_key(layout.cls_array_key(loc), c, 2) for c in range(first, last)]
            if st.quantized:
                keys += [layout.chunk_key(layout.scale_array_key(layout.cls_array_key(loc)), c, 1)
                         for c in range(first, last)]
        keys.append(layout.shard_images_key(s.index))
        moments = layout.shard_moments_key(s.index)
        keys += [f"{moments}/zarr.json"] + [layout.chunk_key(moments, i, 4) for i in range(len(st.locations))]
        st.storage.delete(keys)

    # ------------------------------------------------------------------ adding
    @property
    def n_rows(self) -> int:
        return len([r for r in self._rows if r >= 0])

    def add(self, activations: Mapping[str, np.ndarray], images: Sequence[ImageRecord],
            moments: Mapping[str, Mapping[str, Moments]] | None = None, wait: bool = True) -> PendingWrites | None:
        """Store B images. `moments` ({location: {"cls": Moments, "patches": Moments}} of exactly these
        stored values), when given, replaces the writer's own statistics (a harvest computes them on
        the GPU); give it for every call or for none.

        `wait=False` (a writer made with compute_stats=False): return once the batch's whole chunks
        are queued for the writing threads, with a PendingWrites whose `wait()` returns when they
        have landed; until then the arrays given must stay as they are. The next batch can then be
        queued while this one is written, so the threads never wait between batches. A failed write
        is raised by `wait()` or by `commit()`, and stops the writer."""
        self._check_open()
        st = self.store
        missing = set(st.locations) - {str(k) for k in activations}
        if missing:
            raise ConfigError(f"add() needs every location of the store; missing {sorted(missing)}")
        acts = {str(k): (v if isinstance(v, Quantized) else np.asarray(v)) for k, v in activations.items()
                if str(k) in st.locations}
        b = len(images)
        for loc, x in acts.items():
            if isinstance(x, Quantized):
                if not self._quantized:
                    raise ConfigError(f"{loc}: fp8 codes given to a writer of a {st.dtype} store; give float activations")
                if x.codes.shape != (b, st.n_tokens, st.d_model) or x.scales.shape != (b, st.n_tokens):
                    raise ConfigError(f"{loc}: expected codes ({b}, {st.n_tokens}, {st.d_model}) and scales ({b}, "
                                      f"{st.n_tokens}) for {b} images, got {x.codes.shape} and {x.scales.shape}")
                continue
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
        stored, scales = {}, {}
        for loc, x in acts.items():
            if self._quantized:
                stored[loc], scales[loc] = self._quantize(loc, x, images)
                continue
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
        if moments is not None and self.compute_stats:
            raise ConfigError("pass moments to add() only to a writer made with compute_stats=False")
        try:
            pending = self._store_batch(stored, b, scales, wait=wait or self.compute_stats)
        except BaseException as exc:  # a refused write (full disk, ...): this writer cannot go on
            self._abort(exc)
            raise
        if moments is None and not self.compute_stats:
            self._batches_without_stats += 1
        if moments is not None:
            for loc in st.locations:
                for g in layout.MOMENT_GROUPS:
                    self._moments[loc][g].merge(moments[loc][g])
        for rec in images:
            self._records.append(rec)
            self._rows.append(self._next_row)
            self._next_row += 1
        if pending is None:
            return None
        self._in_flight.append(pending)
        return pending

    def _quantize(self, loc: str, x, images: Sequence[ImageRecord]) -> tuple[np.ndarray, np.ndarray]:
        """fp8: codes and scales of one location's batch, its error measured against the values given.
        Non-finite input is refused, as for every dtype (a NaN or inf would poison its token's scale)."""
        if isinstance(x, Quantized):
            self._lossy_complete = False  # until add_lossy_error brings the error measured where it was quantised
            return np.ascontiguousarray(x.codes, dtype=np.uint8), np.ascontiguousarray(x.scales, dtype=SCALE_DTYPE)
        if x.dtype == np.uint16:
            raise ConfigError("uint16 input is taken as bf16 bit patterns, but this store's dtype is fp8; give floats")
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, refused below by name
            xf = np.asarray(x, dtype=np.float32)
        bad = nonfinite_tokens(xf)
        if bad is not None:
            keys = [images[i].key for i in np.flatnonzero(bad)[:5]]
            raise NonFiniteActivationError(
                f"{loc}: activations of images {keys} are NaN/inf (in float32); fp8 stores only finite values: "
                f"compute in a wider dtype or drop these images with add_dropped()"
            )
        codes, scales = quantize_fp8(xf)
        self._lossy[loc].add(xf, dequantize_fp8(codes, scales))
        return codes, scales

    def add_lossy_error(self, errors: Mapping[str, Mapping]) -> None:
        """Merge the quantisation error of codes given as `Quantized` ({location: {max_abs, max_rel,
        sum_sq_err, sum_sq}}, as `harvest.quantize.quantization_error` measures it) into the commit
        record; without it, a writer given codes records its error as incomplete."""
        self._check_open()
        if self._lossy is None:
            raise ConfigError(f"{self.store.url} stores {self.store.dtype} without loss: there is no error to record")
        for loc, e in errors.items():
            self._lossy[self.store.check_location(loc)].merge(e)
        self._lossy_complete = True

    def _store_batch(self, stored: dict[str, np.ndarray], b: int, scales: dict[str, np.ndarray] | None = None,
                     wait: bool = True) -> PendingWrites | None:
        """Whole chunks of the batch straight to storage (queued only, unless `wait`), the rest into
        the staging buffers (whose chunks are written before this returns: the buffers are reused)."""
        st = self.store
        ci, ri = st.chunk_images, st.region_images
        scales = scales or {}
        direct: list[tuple] = []  # whole chunks straight from this batch
        pos = 0
        while pos < b:
            if self._fill == 0 and b - pos >= ci:
                index = self.shard.row_start // ci + self._chunks_written
                direct += [(loc, index, stored[loc][pos:pos + ci], ci,
                            scales[loc][pos:pos + ci] if self._quantized else None) for loc in st.locations]
                self._chunks_written += 1
                take = ci
            else:
                take = min(b - pos, ci - self._fill)
                for loc, raw in stored.items():
                    self._buf[loc][self._fill:self._fill + take] = raw[pos:pos + take]
                    if self._quantized:
                        self._sbuf[loc][self._fill:self._fill + take] = scales[loc][pos:pos + take]
                self._fill += take
                if self._fill == ci:
                    self._flush_chunk()  # before the staging buffer is refilled
            done = 0
            while done < take:  # CLS tokens go to their own, larger chunks
                n = min(take - done, ri - self._cls_fill)
                for loc, raw in stored.items():
                    self._cls_buf[loc][self._cls_fill:self._cls_fill + n] = raw[pos + done:pos + done + n, 0]
                    if self._quantized:
                        self._cls_sbuf[loc][self._cls_fill:self._cls_fill + n] = scales[loc][pos + done:pos + done + n, 0]
                self._cls_fill += n
                done += n
                if self._cls_fill == ri:
                    self._flush_cls()
            pos += take
        pending = self._write_main(direct, wait=wait)
        self._claim.refresh()  # at most every tenth of its timeout
        return pending

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
        self.store.storage.write_chunk(layout.chunk_key(array_key, index, buf.ndim), self._codec[array_key].framed(buf))

    def _write_main(self, items: list[tuple], wait: bool = True) -> PendingWrites | None:
        """Write whole main-array chunks (location, chunk index, data, valid rows, fp8 scales or None)
        in parallel, with their statistics (of the stored values) when the writer computes them."""
        st = self.store

        def write(item):
            loc, index, chunk, n, scales = item
            self._write_chunk(layout.array_key(loc), index, chunk)
            if scales is not None:
                self._write_chunk(layout.scale_array_key(layout.array_key(loc)), index, scales)
            if self.compute_stats:
                x = dequantize_fp8(chunk[:n], scales[:n]) if scales is not None else to_float32(chunk[:n], st.dtype)
                return Moments.of(x[:, 0]), Moments.of(x[:, 1:])
            return None

        if not wait and self._pool is not None:  # statistics are not computed here (see add)
            return PendingWrites(self, [self._pool.submit(write, item) for item in items])
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
            for buf in self._sbuf.values():
                buf[n:] = np.nan
        index = self.shard.row_start // st.chunk_images + self._chunks_written
        self._write_main([(loc, index, self._buf[loc], n, self._sbuf.get(loc)) for loc in st.locations])
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
            if self._quantized:
                sbuf = self._cls_sbuf[loc]
                if n < st.region_images:
                    sbuf[n:] = np.nan
                self._write_chunk(layout.scale_array_key(layout.cls_array_key(loc)), index, sbuf)

        self._map_locations(flush)
        self._cls_chunks_written += 1
        self._cls_fill = 0

    # ------------------------------------------------------------------ commit
    def commit(self) -> dict:
        """Write what is buffered, the statistics and the image table, then make the shard visible."""
        self._check_open()
        try:
            for pending in self._in_flight:  # every chunk queued by add(wait=False) has landed
                pending.wait()
            commit = self._commit()
        except BaseException as exc:  # nothing is committed: the shard stays `writing`, redone by a rerun
            self._abort(exc)
            raise
        self._close()
        self.store.refresh()
        return commit

    def _commit(self) -> dict:
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
        moments_chunks = self._write_moments(block)
        images = to_parquet_bytes(self._records, self._rows)
        st.storage.write_bytes(layout.shard_images_key(self.shard.index), images)
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
            "images_crc32c": crc32c(images),  # format 1.1: the checksum of images.parquet's bytes
            "moments_chunks": moments_chunks,  # format 1.1: chunk objects of the moments array
            "committed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if self._lossy is not None:
            commit["lossy_error"] = {loc: e.to_dict() for loc, e in self._lossy.items()}
            if not self._lossy_complete:
                commit["lossy_error_complete"] = False  # codes were given without their measured error
        self._claim.check()  # ShardClaimedError if another writer took the shard over meanwhile
        self._set_state(layout.COMMITTED, commit)
        return commit

    def _write_moments(self, block: np.ndarray) -> int:
        """The statistics as a float64 Zarr array, one chunk per location, every chunk written (zarr
        would skip chunks equal to its fill value); returns the number of chunks."""
        path = layout.shard_moments_key(self.shard.index)
        chain = [self.store.codec.serializer(), *self.store.codec.compressors()[-1:]]  # bytes, crc32c
        doc = array_document(shape=block.shape, chunks=(1, *block.shape[1:]), dtype="float64", serializer=chain[0],
                             compressors=chain[1:])
        codec = ChunkCodec([c.to_dict() for c in chain])
        for li in range(block.shape[0]):
            chunk = np.ascontiguousarray(block[li:li + 1], dtype="<f8")
            self.store.storage.write_chunk(layout.chunk_key(path, li, block.ndim), codec.framed(chunk))
        self.store.storage.write_bytes(layout.node_key(path), doc)
        return block.shape[0]

    def close(self) -> None:
        """Stop without committing: the shard stays `writing` (invisible; the next writer redoes it)
        and its claim is released. A no-op after commit."""
        if not self._closed:
            self._abort(None)

    def _abort(self, exc: BaseException | None) -> None:
        self._failed = type(exc).__name__ if exc is not None else None
        self._close()

    def _close(self) -> None:
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown()
        self._release()

    def _check_open(self) -> None:
        if not self._closed:
            return
        if self.shard.committed:
            raise ShardStateError(f"the writer of {self.shard.name} is closed (committed)")
        why = f" after an error ({self._failed})" if self._failed is not None else ""
        raise ShardStateError(f"the writer of {self.shard.name} is closed (stopped{why}, nothing committed); start a "
                              f"new writer to redo the shard")

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._closed:
            self.commit()
        elif not self._closed:
            self._abort(exc)
        # on error the shard stays in state `writing`: invisible, and cleaned by the next writer
