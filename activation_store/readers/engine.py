"""The reading engine behind ShuffledReader and OrderedReader.

Per epoch, every rank computes the same plan: the committed chunks in a random order
(store order when not shuffling), this rank's share (`order[rank::world]`), grouped into windows
of at most `window_tokens` tokens. A window's chunks are fetched and decoded by a thread pool
(numcodecs and preadv release the GIL) straight into one of two preallocated window buffers,
while the other window is served: a random permutation of its tokens is gathered, a batch at a
time, into the output with `torch.index_select` (no per-row Python). State is (epoch, window,
position): resuming reloads one window and continues with exactly the sequence an uninterrupted
reader would have produced.

Batches are gathered by `gather_threads` threads of their own, each running torch on one thread
(a batch split between them), never in the caller's thread: there, every torch op would start an
OpenMP team whose members wait for cores the fetch threads hold (that alone halved the rate on 2
cores). A batch wanted in the storage dtype is gathered straight into its output. Any other
(float32, normalised, another 16-bit type, and every batch of an fp8 store: codes plus a float32
scale per token) is gathered, decoded, normalised and converted in one compiled pass
(`fused_gather`: each value read once and written once, in the output dtype, bit for bit what
torch's ops give; 1.4-2x faster than those ops block by block, 2.8-3.8x for fp8:
`benchmarks/fused_gather.py`). Outputs
come from a BatchPool: a batch stays the caller's for as long as anything refers to it (callers may
keep every batch); memory nothing refers to any more is reused.

Reading ahead: on a local disk the first chunk files of the window after the one being loaded
are announced to the kernel (posix_fadvise WILLNEED) as soon as that load starts, so the disk
works through the window boundary; on an object store a Prefetcher GETs chunk objects `prefetch` ahead
of their decode, `io_concurrency` at a time, across window boundaries, each GET retried with
back-off by the store layer (ChunkReadError naming the chunk when it keeps failing)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from activation_store.devices import torch_device
from activation_store.errors import ConfigError
from activation_store.readers.config import ReaderConfig
from activation_store.readers.normalize import Normalizer
from activation_store.readers.selection import TokenSelection
from activation_store.store import ChunkRef
from activation_store.store.encoding import SCALE_DTYPE, is_quantized, physical_dtype
from activation_store.store.layout import array_key, chunk_key, cls_array_key, scale_array_key
from activation_store.store.storage import ReadPolicy

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_STORAGE_VIEW = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp8": None}  # fp8: none
_RAW_TORCH = {"fp16": torch.float16, "bf16": torch.int16, "fp32": torch.float32, "fp8": torch.uint8}  # same bits
# a gather smaller than this runs in the caller's thread: handing it to a gather thread and back
# (~0.1-0.2 ms) would cost more than it
INLINE_VALUES = 1 << 18
PINNED_OUTPUTS = 3  # GPU staging batches in flight


def window_plan(cfg: ReaderConfig, store, sel: TokenSelection) -> dict:
    """Sizes of a reader's buffers: tokens per window and bytes of each part (what `memory`
    budgets). With `memory`, the windows get what the budget leaves after the fixed buffers; a
    window holds at least one whole chunk."""
    d = store.d_model
    # bytes a stored value occupies in a window (fp8: its code and its share of the token's scale)
    item = np.dtype(physical_dtype(store.dtype)).itemsize + (SCALE_DTYPE.itemsize / d if is_quantized(store.dtype) else 0)
    rows_per_chunk = store.region_images if sel.cls_only else store.chunk_images
    chunk_tokens = rows_per_chunk * (1 if sel.cls_only else store.n_tokens)
    chunk_bytes = chunk_tokens * d * item
    key = cls_array_key(cfg.location) if sel.cls_only else array_key(cfg.location)
    codec = store.chunk_codec(key)
    preads = store.storage.is_local and codec is not None and codec.uncompressed  # straight into the window
    fixed = {
        # chunk objects held as bytes: fetched ahead (object stores) and being decoded (one a thread)
        "objects": 0 if preads else (cfg.threads + (0 if store.storage.is_local else cfg.prefetch)) * chunk_bytes,
        # a staging chunk per fetch thread when a token subset is packed out of whole chunks
        "staging": cfg.threads * chunk_bytes if sel.indices is not None else 0,
        "pinned": PINNED_OUTPUTS * cfg.batch_size * d * item if cfg.device.startswith("cuda") else 0,
    }
    fixed = {k: int(v) for k, v in fixed.items()}  # fp8's item is fractional
    fixed_bytes = sum(fixed.values())
    if cfg.memory is not None:
        window = int((cfg.memory - fixed_bytes) // (2 * d * item))
        if window < chunk_tokens:
            need = int(fixed_bytes + 2 * chunk_tokens * d * item)
            raise ConfigError(f"memory {cfg.memory:,} bytes is too small for this store: two windows of one "
                              f"chunk ({chunk_tokens:,} tokens x {d} x {item:g} bytes) and the fixed buffers need "
                              f"{need:,}; give at least that (or lower prefetch / threads)")
        window = int(window)
    else:
        window = max(int(cfg.buffer_tokens), chunk_tokens)
    window_bytes = int(round(window * d * item))
    return {"window_tokens": window, "chunk_tokens": chunk_tokens, "window_bytes": window_bytes,
            "fixed_bytes": fixed_bytes, "fixed": fixed, "total_bytes": 2 * window_bytes + fixed_bytes}


class Engine:
    """Iterates batches for one epoch plan; see the module docstring."""

    def __init__(self, store, cfg: ReaderConfig, sel: TokenSelection, normalizer: Normalizer, rank: int,
                 world_size: int) -> None:
        self.store, self.location, self.sel, self.cfg = store, cfg.location, sel, cfg
        self.batch_size, self.seed, self.rank, self.world = cfg.batch_size, cfg.seed, rank, world_size
        self.shuffle, self.drop_last, self.return_ids = cfg.shuffle, cfg.drop_last, cfg.return_ids
        self.split = None if cfg.split == "all" else (cfg.split, cfg.holdout)
        self.out_dtype = TORCH_DTYPES[cfg.dtype]
        self.device = torch_device(cfg.device)
        self.normalizer = normalizer
        self.d = store.d_model
        self.pdtype = physical_dtype(store.dtype)
        self.rows_per_chunk = store.region_images if sel.cls_only else store.chunk_images
        self.sizes = window_plan(cfg, store, sel)
        self.chunk_tokens = self.sizes["chunk_tokens"]
        # a window holds at least one whole chunk (read whole, padding included); windows never
        # hold more than window_tokens (see plan), so that is all a buffer needs
        self.buffer_tokens = self.capacity = self.sizes["window_tokens"]
        self.buffers = [np.empty((self.capacity, self.d), dtype=self.pdtype) for _ in range(2)]
        for b in self.buffers:
            b.fill(0)  # fault the pages in now, not while the first windows load
        # torch views of the same memory: index_select gathers rows ~6x faster than np.take here
        self.buffer_views = [torch.from_numpy(b.view(np.int16) if b.dtype == np.uint16 else b) for b in self.buffers]
        # fp8: each window's per-token scales, beside its codes
        self.quantized = is_quantized(store.dtype)
        self.scale_buffers = [np.zeros(self.capacity, dtype=SCALE_DTYPE) for _ in range(2)] if self.quantized else []
        self.scale_views = [torch.from_numpy(b) for b in self.scale_buffers]
        self.pool = ThreadPoolExecutor(cfg.threads, thread_name_prefix="actstore-read")
        self._readahead_pool = None
        self._local = threading.local()
        self.raw_dtype = _RAW_TORCH[store.dtype]
        self.storage_dtype = _STORAGE_VIEW[store.dtype]
        self.cuda = self.device.type == "cuda"
        pin = self.cuda and torch.cuda.is_available()
        self.out = [torch.empty((cfg.batch_size, self.d), dtype=self.raw_dtype, pin_memory=pin)
                    for _ in range(PINNED_OUTPUTS)] if self.cuda else []
        self.out_scales = [torch.empty((cfg.batch_size,), dtype=torch.float32, pin_memory=pin)
                           for _ in range(PINNED_OUTPUTS)] if self.cuda and self.quantized else []
        self.out_ready = [None] * PINNED_OUTPUTS
        # on the CPU, a batch wanted in the storage dtype is gathered straight into a fresh tensor;
        # any other goes through the fused gather (see the module docstring)
        self.fresh_native = (not self.cuda and normalizer.mode == "none" and self.out_dtype == self.storage_dtype
                             and not self.quantized)
        if not self.cuda and not self.fresh_native:
            self._fused_setup(store.dtype, cfg.dtype)
        self.batches = BatchPool((cfg.batch_size, self.d), self.raw_dtype if self.fresh_native else self.out_dtype)
        self.gather_threads = cfg.gather_threads or default_gather_threads()
        self.gpool = _single_threaded_torch_pool(self.gather_threads)
        self.token_index = sel.token_index()
        self.remote = not store.storage.is_local
        self.policy = ReadPolicy(attempts=cfg.io_attempts, timeout=cfg.io_timeout)
        if self.remote:
            store.storage.connect()
        self._layout = [None, None]

    # ------------------------------------------------------------------ the plan
    def plan(self, epoch: int, chunks: list[ChunkRef]) -> dict:
        """This rank's windows for an epoch, and how many batches it yields."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(chunks))
        else:
            order = np.arange(len(chunks))
        per_image = self.sel.per_image
        counts = [self._rows_in_split(u) * per_image for u in chunks]
        rank_tokens = [sum(counts[i] for i in order[r::self.world]) for r in range(self.world)]
        mine = order[self.rank::self.world]
        windows, current, used = [], [], 0
        for i in mine:
            u = chunks[i]
            cost = self._slot_tokens(u)  # buffer rows the chunk occupies
            if current and used + cost > self.buffer_tokens:
                windows.append(current)
                current, used = [], 0
            current.append(u)
            used += cost
        if current:
            windows.append(current)
        total = rank_tokens[self.rank]
        if self.drop_last:
            n_batches = min(rank_tokens) // self.batch_size  # equal on every rank (DDP needs that)
        else:
            n_batches = -(-total // self.batch_size)
        return {"windows": windows, "tokens": total, "n_batches": n_batches,
                "yield_tokens": n_batches * self.batch_size if self.drop_last else total}

    # ------------------------------------------------------------------ train / eval split
    def _in_split(self, rows: np.ndarray) -> np.ndarray:
        """Images (rows) in this reader's split: a fixed hash of the row puts a `holdout` fraction
        of the images in 'eval' and the rest in 'train', so the split is by image, never by token."""
        name, holdout = self.split
        h = ((rows.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)).astype(np.float64) / 2**24
        return (h < holdout) if name == "eval" else (h >= holdout)

    def _rows_in_split(self, chunk: ChunkRef) -> int:
        if self.split is None:
            return chunk.n_rows
        return int(self._in_split(np.arange(chunk.row_start, chunk.row_start + chunk.n_rows)).sum())

    # ------------------------------------------------------------------ loading a window
    def _slot_tokens(self, chunk: ChunkRef) -> int:
        """Whole chunks land as they are stored (padding included); selected tokens are packed."""
        return self.chunk_tokens if self.sel.indices is None else chunk.n_rows * self.sel.per_image

    def _chunk_key(self, chunk: ChunkRef) -> str:
        return chunk_key(chunk.array_key, chunk.index, 2 if self.sel.cls_only else 3)

    def _scale_key(self, chunk: ChunkRef) -> str:
        """fp8: the chunk of the scales beside chunk `chunk` of the codes."""
        return chunk_key(scale_array_key(chunk.array_key), chunk.index, 1 if self.sel.cls_only else 2)

    def _object_keys(self, chunk: ChunkRef) -> tuple[str, ...]:
        """Every object a chunk's load reads: its codes or values (fp8: and its scales)."""
        return (self._chunk_key(chunk), self._scale_key(chunk)) if self.quantized else (self._chunk_key(chunk),)

    def _staging(self, chunk: ChunkRef) -> tuple[np.ndarray, np.ndarray | None]:
        shape = (chunk.rows_per_chunk, self.store.n_tokens, self.d)
        st = getattr(self._local, "staging", None)
        if st is None or st[0].shape != shape:
            st = self._local.staging = (np.empty(shape, dtype=self.pdtype),
                                        np.empty(shape[:2], dtype=SCALE_DTYPE) if self.quantized else None)
        return st

    def _load_chunk(self, chunk: ChunkRef, buf: np.ndarray, offset: int, scales: np.ndarray | None = None) -> None:
        """A chunk into window buffer `buf` from token `offset` on (and, fp8, its scales into `scales`)."""
        fetch_scales = self.store.fetch_scales_into
        if self.sel.cls_only:
            self.store.fetch_chunk_into(chunk.array_key, chunk.index, buf[offset:offset + chunk.rows_per_chunk])
            if scales is not None:
                fetch_scales(chunk.array_key, chunk.index, scales[offset:offset + chunk.rows_per_chunk])
        elif self.sel.indices is None:
            region = buf[offset:offset + self.chunk_tokens].reshape(chunk.rows_per_chunk, self.store.n_tokens, self.d)
            self.store.fetch_chunk_into(chunk.array_key, chunk.index, region)
            if scales is not None:
                fetch_scales(chunk.array_key, chunk.index,
                             scales[offset:offset + self.chunk_tokens].reshape(chunk.rows_per_chunk, self.store.n_tokens))
        else:
            staging, staging_scales = self._staging(chunk)
            self.store.fetch_chunk_into(chunk.array_key, chunk.index, staging)
            k = self.sel.per_image
            region = buf[offset:offset + chunk.n_rows * k].reshape(chunk.n_rows, k, self.d)
            np.take(staging[:chunk.n_rows], self.sel.indices, axis=1, out=region)
            if scales is not None:
                fetch_scales(chunk.array_key, chunk.index, staging_scales)
                np.take(staging_scales[:chunk.n_rows], self.sel.indices, axis=1,
                        out=scales[offset:offset + chunk.n_rows * k].reshape(chunk.n_rows, k))

    def start_window(self, window: list[ChunkRef], slot: int) -> list[Future]:
        """Submit every chunk of a window; returns the futures and fills `self._layout[slot]`."""
        buf = self.buffers[slot]
        offsets, offset = [], 0
        for u in window:
            offsets.append(offset)
            offset += self._slot_tokens(u)
        self._layout[slot] = (window, offsets)
        scales = self.scale_buffers[slot] if self.quantized else None
        return [self.pool.submit(self._load_chunk, u, buf, off, scales) for u, off in zip(window, offsets)]

    def _read_ahead(self, window: list[ChunkRef]) -> None:
        """Local disks: let the kernel start reading the first `threads` chunk files of a window
        now (in a thread of its own: WILLNEED may block while it queues the reads). That keeps
        the disk busy while the window before it finishes loading with fewer chunks than threads
        in flight; announcing the whole window competes with that load instead (measured: 0.76-0.94
        of a cold preadv, against 0.95-0.98 for the first `threads` chunks and 0.85-0.93 for none)."""
        if self.remote or not self.cfg.readahead or not hasattr(os, "posix_fadvise"):
            return
        if self._readahead_pool is None:
            self._readahead_pool = ThreadPoolExecutor(1, thread_name_prefix="actstore-readahead")
        paths = [self.store.storage.path(self._chunk_key(u)) for u in window[:self.cfg.threads]]
        if self.quantized:  # every scale file of the window first (1/d of its bytes): their reads then cost no wait
            paths = [self.store.storage.path(self._scale_key(u)) for u in window] + paths
        self._readahead_pool.submit(_will_need, paths)

    def _prefetcher(self, windows: list[list[ChunkRef]]):
        """Object stores, chunks our own codec decodes: GET them ahead, in window order."""
        if not self.remote or self.store.chunk_codec(windows[0][0].array_key) is None:
            return None
        # fp8: each chunk's scales (1/d of its bytes) fetched beside its codes, not after them; the
        # depth counts chunks, so as many objects a chunk as it reads
        per_chunk = len(self._object_keys(windows[0][0]))
        keys = [k for w in windows for u in w for k in self._object_keys(u)]
        return self.store.storage.prefetcher(keys, per_chunk * self.cfg.prefetch, self.cfg.io_concurrency, self.policy)

    def window_order(self, epoch: int, w: int, slot: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Buffer positions of the window's valid tokens, permuted (or in order), and their ids."""
        window, offsets = self._layout[slot]
        per_image = self.sel.per_image
        positions = np.concatenate([off + np.arange(u.n_rows * per_image) for u, off in zip(window, offsets)])
        ids = None
        if self.return_ids or self.split is not None:
            rows = np.concatenate([u.row_start + np.repeat(np.arange(u.n_rows), per_image) for u in window])
            toks = np.concatenate([np.tile(self.token_index, u.n_rows) for u in window])
            ids = np.stack([rows, toks], axis=1)
            if self.split is not None:
                keep = self._in_split(rows)
                positions, ids = positions[keep], ids[keep]
            if not self.return_ids:
                ids = None
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch, self.rank, self.world, w]).permutation(len(positions))
            positions = positions[perm]
            if ids is not None:
                ids = ids[perm]
        return positions, ids

    # ------------------------------------------------------------------ one epoch
    def iterate(self, epoch: int, plan: dict, start_window: int = 0, start_pos: int = 0, start_batch: int = 0):
        """Yield (window, position, batch tensor, ids) for the epoch, from a given point."""
        self._layout = [None, None]
        windows = plan["windows"]
        n_batches = plan["n_batches"]
        if start_batch >= n_batches or not windows:
            return
        prefetcher = self._prefetcher(windows[start_window:])
        next_futures = None
        try:
            w, pos, slot = start_window, start_pos, 0
            next_futures = self.start_window(windows[w], slot)  # drained below should this fail
            if w + 1 < len(windows):
                self._read_ahead(windows[w + 1])
            for f in next_futures:
                f.result()
            order, ids = self.window_order(epoch, w, slot)
            next_futures = self._next_window(windows, w, 1 - slot)
            batch_i = start_batch
            out_i = 0
            order_t = torch.from_numpy(order)
            while batch_i < n_batches:
                want = min(self.batch_size, plan["yield_tokens"] - batch_i * self.batch_size)
                out_t = self._new_batch(out_i, want)
                filled = 0
                id_parts = []
                while filled < want:
                    if pos >= len(order):
                        if next_futures is None:
                            break
                        for f in next_futures:
                            f.result()
                        w, slot, pos = w + 1, 1 - slot, 0
                        order, ids = self.window_order(epoch, w, slot)
                        order_t = torch.from_numpy(order)
                        next_futures = self._next_window(windows, w, 1 - slot)
                    take = min(want - filled, len(order) - pos)
                    self._gather_split(slot, order_t[pos:pos + take], out_t, filled)
                    if ids is not None:
                        id_parts.append(ids[pos:pos + take])
                    filled += take
                    pos += take
                if filled == 0:
                    break
                batch_i += 1
                batch = self._finish(out_t, out_i, filled)
                out_i = (out_i + 1) % PINNED_OUTPUTS
                yield w, pos, batch, (torch.from_numpy(np.concatenate(id_parts)) if id_parts else None)
        finally:
            if next_futures is not None:
                for f in next_futures:
                    f.cancel()
                for f in next_futures:
                    if not f.cancelled():
                        try:
                            f.result()
                        except Exception:  # the epoch is over (or failed already): nobody reads it
                            pass
            if prefetcher is not None:
                prefetcher.close()

    def _next_window(self, windows, w: int, slot: int) -> list[Future] | None:
        """Start loading window w + 1 into `slot`, and read ahead the one after it."""
        if w + 1 >= len(windows):
            return None
        futures = self.start_window(windows[w + 1], slot)
        if w + 2 < len(windows):
            self._read_ahead(windows[w + 2])
        return futures

    # ------------------------------------------------------------------ batches
    def _new_batch(self, i: int, n: int) -> torch.Tensor:
        if self.cuda:
            if self.out_ready[i] is not None:
                self.out_ready[i].synchronize()  # its previous copy to the device is done
            return self.out[i]
        return self.batches.take(n)

    def _fused_setup(self, storage_dtype: str, out_dtype: str) -> None:
        """The numpy views and float32 normalisation the fused gather takes, and its kernel compiled.
        Imported here, not above: a reader on a GPU decodes on the device and never needs numba
        (nor its ~0.5 s import)."""
        from activation_store.readers import fused_gather

        self.fused = fused_gather
        self.fused_src = [b.view(fused_gather.SOURCE_VIEW[storage_dtype]) for b in self.buffers]
        self.fused_scales = self.scale_buffers or [fused_gather.NO_SCALES] * 2
        self.fused_out_view = fused_gather.OUTPUT_VIEW[out_dtype]
        self.fused_normalise = self.normalizer.mode != "none"
        self.fused_shift, self.fused_scale = self.normalizer.float32_arrays()  # what apply_ uses
        fused_gather.warm_up(storage_dtype, out_dtype)

    def _gather_split(self, slot: int, idx: torch.Tensor, out: torch.Tensor, start: int) -> None:
        """`_gather` in the gather threads, the rows split evenly between them."""
        n = len(idx)
        if n * self.d <= INLINE_VALUES:
            self._gather(slot, idx, out, start)
            return
        step = -(-n // self.gather_threads)
        futs = [self.gpool.submit(self._gather, slot, idx[a:a + step], out, start + a) for a in range(0, n, step)]
        for f in futs:
            f.result()

    def _gather(self, slot: int, idx: torch.Tensor, out: torch.Tensor, start: int) -> None:
        """Rows `idx` of window buffer `slot` into out[start:start + len(idx)]."""
        src = self.buffer_views[slot]
        n = len(idx)
        if self.cuda or self.fresh_native:
            torch.index_select(src, 0, idx, out=out[start:start + n])
            if self.cuda and self.quantized:
                out_scales = self.out_scales[self._cuda_slot(out)]
                torch.index_select(self.scale_views[slot], 0, idx, out=out_scales[start:start + n])
            return
        rows = out[start:start + n]
        dst = rows.numpy() if self.out_dtype == torch.float32 else rows.view(torch.int16).numpy().view(self.fused_out_view)
        self.fused.gather_rows(self.fused_src[slot], idx.numpy(), self.fused_scales[slot], self.fused_shift,
                               self.fused_scale, self.fused_normalise, dst)

    def _cuda_slot(self, out: torch.Tensor) -> int:
        return next(i for i, t in enumerate(self.out) if t.data_ptr() == out.data_ptr())

    def _finish(self, out_t: torch.Tensor, i: int, n: int) -> torch.Tensor:
        if not self.cuda:
            x = out_t if n == len(out_t) else out_t[:n]
            return x.view(self.storage_dtype) if self.fresh_native and self.raw_dtype != self.storage_dtype else x
        if self.quantized:  # codes and scales travel (1 byte a value), the device dequantises
            codes = out_t[:n].to(self.device, non_blocking=True)
            scales = self.out_scales[i][:n].to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            self.out_ready[i] = ev
            x = codes.view(torch.float8_e4m3fn).to(torch.float32) * scales.unsqueeze(1)
            x = self.normalizer.apply(x)
            return x if self.out_dtype == torch.float32 else x.to(self.out_dtype)
        raw = out_t[:n].view(self.storage_dtype)
        x = raw.to(self.device, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self.out_ready[i] = ev
        x = self.normalizer.apply(x.to(torch.float32))
        return x if self.out_dtype == torch.float32 else x.to(self.out_dtype)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        if self.gpool is not None:
            self.gpool.shutdown(wait=True)
        if self._readahead_pool is not None:
            self._readahead_pool.shutdown(wait=True)


class BatchPool:
    """Output batches for the CPU. A batch handed out is the caller's for as long as the caller
    (or anything else: a view, a numpy array, an autograd graph) refers to it; once nothing but
    this pool does, its memory is written again for a later batch. Without that, the allocator
    keeps ~20 freed batches in its heap (fragmented by the small allocations in between: ~160 MB
    at fp16, 4096 x 1024, ~320 MB as float32), and a fresh mapping per batch costs ~3x the gather
    in page faults. A caller that keeps every batch gets new memory for each."""

    KEEP = 4  # batches the pool holds on to

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype) -> None:
        self.shape, self.dtype = shape, dtype
        self.free: list[torch.Tensor] = []
        self.enabled = hasattr(torch._C, "_storage_Use_Count")

    @staticmethod
    def _unused(t: torch.Tensor) -> bool:
        # the tensor itself and the temporary storage object of this call: nothing else
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata) <= 2

    def take(self, n: int) -> torch.Tensor:
        if not self.enabled:
            return torch.empty((n, self.shape[1]), dtype=self.dtype)
        for t in self.free:
            if self._unused(t):
                return t[:n]  # a tensor of its own over the memory: it is what counts as a use
        t = torch.empty(self.shape, dtype=self.dtype)
        if len(self.free) < self.KEEP:
            self.free.append(t)
        else:  # the caller holds on to batches: let the oldest go with them
            self.free = [*self.free[1:], t]
        return t[:n]


def default_gather_threads() -> int:
    """The cores this process may use, 1 to 4 (the fetch threads mostly wait on the disk or the
    network, or copy in the kernel; four gather threads already exceed a socket's memory bandwidth)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def _one_torch_thread(barrier: threading.Barrier) -> None:
    torch.get_num_threads()  # torch's lazy per-thread set-up first: it would undo the next line later
    torch.set_num_threads(1)  # this thread's OpenMP team only (see _single_threaded_torch_pool)
    try:
        barrier.wait(timeout=10)
    except threading.BrokenBarrierError:
        pass


def _single_threaded_torch_pool(n: int) -> ThreadPoolExecutor:
    """A pool whose threads run torch ops on one thread each: their many small gathers would
    otherwise each start an OpenMP team that, on a machine whose cores the fetch threads keep
    busy, waits for its members to be scheduled. torch.set_num_threads is per thread for OpenMP,
    but also sets the default of threads created later: the caller's value is put back."""
    mine = torch.get_num_threads()
    barrier = threading.Barrier(n + 1)
    pool = ThreadPoolExecutor(n, thread_name_prefix="actstore-gather", initializer=_one_torch_thread,
                              initargs=(barrier,))
    for _ in range(n):
        pool.submit(int)  # start every thread now
    try:
        barrier.wait(timeout=10)
    except threading.BrokenBarrierError:
        pass
    torch.set_num_threads(mine)
    return pool


def _will_need(paths: list[str]) -> None:
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue  # a missing chunk is reported by its read, not here
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)
