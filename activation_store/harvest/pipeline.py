"""The harvest: input shards -> decode workers -> ViT forward with hooks -> the store.

Overlap, on a GPU: decode runs in worker processes; pixels go to pinned host memory and to the
device without blocking; the hooks copy each requested block's output into a preallocated
device buffer in the storage dtype; statistics and finiteness are computed there; a separate
copy stream moves the buffer into pinned host slots while the next batch runs; a writer thread
hands the slots to the shard writer, which encodes and writes whole chunks in its own threads.
Two device buffers and a ring of host slots keep every stage busy. On the CPU the same code runs
with plain copies.

A failure in any stage (the writer thread, a decode worker, even one killed by the system, the
source, the forward) stops the shard at once: the writer thread drains what is queued without
writing it, the main thread never waits on a stage that has failed, and the first failure is
raised, our own errors as they are, any other as one HarvestError naming the stage and the cause.
The shard stays uncommitted, so a rerun redoes it from scratch."""

from __future__ import annotations

import collections
import itertools
import multiprocessing as mp
import queue
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import NoReturn

import numpy as np
import torch
from tqdm import tqdm

from activation_store.errors import ActivationStoreError, HarvestError
from activation_store.faults import kill_point
from activation_store.harvest.decode import NONFINITE, Decoded, decode_image
from activation_store.harvest.device_graph import CapturedStep, device_constant
from activation_store.harvest.model import LoadedViT
from activation_store.harvest.quantize import ERROR_FIGURES, dequantize_fp8, error_figures, quantize_fp8
from activation_store.harvest.sources import InputShard, Sample
from activation_store.store import ImageRecord
from activation_store.store.writer import Quantized
from activation_store.store.layout import MOMENT_GROUPS
from activation_store.store.stats import Moments

# the dtype the forward's outputs are copied into: the storage dtype, or float32 for fp8, which is
# quantised from float32 (on the device) and shipped as codes and scales
STORAGE_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.float32}
_CHUNK = 4  # samples per decode task
_CHUNKS_IN_FLIGHT_PER_WORKER = 16  # decoded images wait here for the forward: a bound on their memory
_POLL_S = 0.2  # how often a waiting thread looks whether another stage has failed
_MANAGER_JOIN_S = 30.0  # the executor's own thread ends within milliseconds once its workers are gone
HOST_SLOTS = 4  # batches in host memory: one being filled, one queued, two being written

_worker_transform = None
_worker_min_size = 2
_worker_ring: PixelRing | None = None


class PixelRing:
    """Decoded pixels in shared memory: slots of one image each that decode workers fill in place,
    so that only a slot's index crosses the process boundary, not a pickled 150 KB array (which the
    harvest process would unpickle and copy under its GIL, image after image). The harvest process
    owns the slots: it hands a free one out with every sample and takes it back once the pixels are
    copied into a batch."""

    def __init__(self, shape: tuple[int, int, int], slots: int, name: str | None = None) -> None:
        self.shape, self.slots = tuple(shape), slots
        nbytes = slots * int(np.prod(shape))
        self.owner = name is None
        # workers attach by name; forked and spawned ones share the owner's resource tracker, which
        # keeps one entry per name, so the owner's unlink is the one that counts
        self.shm = shared_memory.SharedMemory(create=True, size=nbytes) if self.owner else shared_memory.SharedMemory(name=name)
        self.array = np.ndarray((slots, *self.shape), dtype=np.uint8, buffer=self.shm.buf)

    def attach_args(self) -> tuple:
        return self.shape, self.slots, self.shm.name

    def close(self) -> None:
        self.array = None  # the view must go before the buffer can
        self.shm.close()
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


def _init_worker(transform, min_size: int, in_child: bool = True, ring_args: tuple | None = None) -> None:
    global _worker_transform, _worker_min_size, _worker_ring
    _worker_transform, _worker_min_size = transform, min_size
    if ring_args is not None:
        _worker_ring = PixelRing(*ring_args)
    if in_child:
        torch.set_num_threads(1)  # decoding needs no torch threads; they would compete with the forward


def _decode_task(sample: Sample, slot: int | None = None) -> tuple[Sample, Decoded]:
    if sample.status is not None:  # known bad before decoding (a truncated tar, an unreadable file)
        return sample, Decoded(None, sample.status, sample.error)
    decoded = decode_image(sample.data, _worker_transform, _worker_min_size)
    sample.data = None  # do not ship the bytes back
    if slot is not None and decoded.pixels is not None and decoded.pixels.shape == _worker_ring.shape:
        _worker_ring.array[slot] = decoded.pixels
        decoded.pixels = slot  # the index, not the array: the harvest process reads the slot
    return sample, decoded


def _decode_chunk(samples: list[Sample], slots: list[int] | None = None) -> list[tuple[Sample, Decoded]]:
    return [_decode_task(sample, None if slots is None else slots[i]) for i, sample in enumerate(samples)]


class DecodePool:
    """Ordered parallel decoding: results come back in sample order, whatever the worker count.
    A worker that dies (killed for memory, say) fails the iteration with BrokenProcessPool instead
    of leaving it waiting forever. Given `pixel_shape` (the model's (H, W, 3)), workers decode into a
    PixelRing in shared memory; where shared memory cannot be had (a container's small /dev/shm),
    pixels come back pickled, as without it."""

    def __init__(self, transform, workers: int, min_size: int, use_fork: bool,
                 pixel_shape: tuple[int, int, int] | None = None) -> None:
        self.workers = workers
        self.ring = None
        if workers > 0:
            if pixel_shape is not None:
                try:
                    # every image that may be in flight has a slot: the chunks ahead of the consumer, one
                    # being consumed, and those the feeder holds while it waits for the window
                    self.ring = PixelRing(pixel_shape, (_CHUNKS_IN_FLIGHT_PER_WORKER * workers + 2) * _CHUNK)
                except OSError:
                    self.ring = None
            ctx = mp.get_context("fork" if use_fork else "spawn")
            self.pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                            initargs=(transform, min_size, True,
                                                      self.ring.attach_args() if self.ring else None))
        else:
            _init_worker(transform, min_size, in_child=False)
            self.pool = None

    def warm_up(self) -> None:
        """Wait until every worker process is up (spawned workers import torch: seconds)."""
        if self.pool is not None:
            list(self.pool.map(time.sleep, [0.05] * (2 * self.workers)))

    def imap(self, samples):
        if self.pool is None:
            return map(_decode_task, samples)
        return _OrderedDecode(self.pool, samples, _CHUNKS_IN_FLIGHT_PER_WORKER * self.workers, self.ring)

    def close(self) -> None:
        """Stop the workers at once, even mid-shard, and leave no thread that holds the interpreter's exit.
        Why the private attributes: on a failure, chunks are still queued for the workers we kill, and
        the executor's queue-feeder thread stays blocked writing them into a pipe that a later forked
        process (the next pool's workers) still holds open. Python joins that feeder, and the executor's
        manager thread waits on it, at exit: the process then never ends (seen as a CI run that printed
        its results and hung). Cancelling the join drops what was queued, which is what we want."""
        if self.pool is None:
            return
        pool, self.pool = self.pool, None
        processes = list((getattr(pool, "_processes", None) or {}).values())
        call_queue = getattr(pool, "_call_queue", None)
        if call_queue is not None:
            call_queue.cancel_join_thread()
        manager = getattr(pool, "_executor_manager_thread", None)
        pool.shutdown(wait=False, cancel_futures=True)
        for p in processes:  # as Pool.terminate did: a worker stuck on one image must not hold us
            p.terminate()
        for p in processes:
            p.join()
        if manager is not None:
            manager.join(timeout=_MANAGER_JOIN_S)
        if self.ring is not None:  # no worker is left to write into it
            self.ring.close()
            self.ring = None


class _OrderedDecode:
    """The decoded samples, in order, from a process pool: a feeder thread reads the samples and
    submits them in chunks, at most `window` chunks ahead of the consumer. A failure to read a
    sample is raised in its place; so is a failed chunk (BrokenProcessPool for a dead worker).
    With a PixelRing, each sample goes out with a free slot, and an item's pixels are a view of
    its slot: valid until the next item is asked for, when the slot goes back to the free list."""

    def __init__(self, pool: ProcessPoolExecutor, samples, window: int, ring: PixelRing | None = None) -> None:
        self._pending: queue.Queue = queue.Queue(maxsize=window)  # futures, a read error, or None at the end
        self._stop = threading.Event()
        self._ready = iter(())
        self._ended = False
        self._ring = ring
        self._free: queue.Queue | None = None
        self._lent: int | None = None  # the slot of the item last returned
        if ring is not None:
            self._free = queue.Queue()
            for i in range(ring.slots):
                self._free.put(i)
        threading.Thread(target=self._feed, args=(pool, iter(samples)), daemon=True).start()

    def _feed(self, pool: ProcessPoolExecutor, samples) -> None:
        try:
            while not self._stop.is_set():
                chunk = list(itertools.islice(samples, _CHUNK))
                if not chunk:
                    break
                slots = self._take_slots(len(chunk)) if self._ring is not None else None
                if self._stop.is_set():
                    break
                self._offer((pool.submit(_decode_chunk, chunk, slots), slots))
        except BaseException as exc:  # raised by the consumer, in order
            self._offer(exc)
        self._offer(None)

    def _take_slots(self, n: int) -> list[int]:
        slots: list[int] = []
        while len(slots) < n and not self._stop.is_set():
            try:
                slots.append(self._free.get(timeout=_POLL_S))
            except queue.Empty:
                continue
        return slots

    def _offer(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._pending.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self) -> tuple[Sample, Decoded]:
        if self._lent is not None:  # the consumer has copied the last item's pixels
            self._free.put(self._lent)
            self._lent = None
        while True:
            item = next(self._ready, None)
            if item is not None:
                return self._lend(item)
            if self._ended:
                raise StopIteration
            pending = self._pending.get()
            if pending is None:
                self._ended = True
                raise StopIteration
            if isinstance(pending, BaseException):
                self._ended = True
                raise pending
            future, slots = pending
            self._ready = iter(self._give_back_unused(future.result(), slots))

    def _give_back_unused(self, items: list[tuple[Sample, Decoded]], slots: list[int] | None) -> list:
        """A chunk's results; the slots that its dropped images did not fill are free again at once."""
        if slots is not None:
            for (_, dec), slot in zip(items, slots):
                if not isinstance(dec.pixels, int):
                    self._free.put(slot)
        return items

    def _lend(self, item: tuple[Sample, Decoded]) -> tuple[Sample, Decoded]:
        sample, dec = item
        if isinstance(dec.pixels, int):
            self._lent = dec.pixels
            dec.pixels = self._ring.array[self._lent]
        return sample, dec

    def close(self) -> None:
        self._stop.set()


class _Failure:
    """The first failure of a shard's pipeline, from whichever thread saw it, and in which stage."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.exc: BaseException | None = None
        self.stage = ""
        self.now = "decode"  # the main thread's stage: what an exception it catches is blamed on

    def set(self, stage: str, exc: BaseException) -> None:
        with self._lock:
            if self.exc is None:
                self.exc, self.stage = exc, stage

    def __bool__(self) -> bool:
        return self.exc is not None


_STAGES = {
    "write": ("writing it to the store", "check the store's storage (free space, permissions, credentials, the "
              "object store's health)"),
    "decode": ("reading or decoding its images", "check the input (the files, the tar, the network)"),
    "forward": ("the model's forward pass", "check the device (out of memory? try a smaller --batch-size)"),
}


def _raise_failure(shard: InputShard, stage: str, exc: BaseException) -> NoReturn:
    """Raise what a failed shard raises: our own errors (and KeyboardInterrupt) as they are, any
    other error as one HarvestError line naming the shard, the stage, the cause and what to do."""
    if isinstance(exc, ActivationStoreError) or not isinstance(exc, Exception):
        raise exc
    what, todo = _STAGES[stage]
    cause = " ".join(f"{type(exc).__name__}: {exc}".split())
    if isinstance(exc, BrokenProcessPool):
        cause = "a decode worker process died (killed by the system, out of memory?)"
        todo = "try fewer --workers or a smaller --batch-size"
    if len(cause) > 500:
        cause = cause[:500] + "..."
    raise HarvestError(
        f"harvest stopped on input shard {shard.name}: {what} failed: {cause}. The shard is left uncommitted; "
        f"{todo}, then rerun the same command: committed shards are skipped and this one is redone") from exc


@dataclass
class _Slot:
    """Pinned host memory for one batch: activations, per-image finiteness, statistics; for fp8
    stores the codes, scales and per-image quantisation error (and, on the CPU only, the float32
    values the forward writes and the codes are made from)."""

    acts: torch.Tensor  # (n_locations, B, T, D) storage dtype (float32 for fp8; empty for fp8 on CUDA)
    bad: torch.Tensor  # (B,) bool
    stats: torch.Tensor  # (n_locations, 2, 3, D) float64: mean, M2, absmax per token group
    counts: torch.Tensor  # (n_locations, 2) int64
    codes: torch.Tensor | None = None  # fp8: (n_locations, B, T, D) uint8
    scales: torch.Tensor | None = None  # fp8: (n_locations, B, T) float32
    errors: torch.Tensor | None = None  # fp8: (n_locations, B, len(ERROR_FIGURES)) float64
    done: torch.cuda.Event | None = None


class ShardRunner:
    """Runs the model over input shards and writes them, one shard writer at a time."""

    def __init__(self, model: LoadedViT, store, batch_size: int, pool: DecodePool, progress: tqdm | None,
                 claim_timeout_s: float | None = None, cuda_graph: bool = False) -> None:
        self.model, self.store, self.batch_size, self.pool, self.progress = model, store, batch_size, pool, progress
        self.writer_options = {} if claim_timeout_s is None else {"claim_timeout_s": claim_timeout_s}
        self.locations = store.locations
        self.loc_index = {int(loc.split("_")[1]): i for i, loc in enumerate(self.locations)}
        self.device = model.device
        self.cuda = self.device.type == "cuda"
        self.storage_dtype = STORAGE_TORCH_DTYPES[store.dtype]
        self.fp8 = store.dtype == "fp8"
        n_loc, b, t, d = len(self.locations), batch_size, store.n_tokens, store.d_model
        h, w = model.preprocess["image_size"]
        pin = self.cuda
        self.pixels = [torch.empty((b, h, w, 3), dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        # on CUDA the pixels are copied into a device buffer of their own: a captured graph reads
        # them from a fixed address
        self.pix_dev = [torch.empty((b, h, w, 3), dtype=torch.uint8, device=self.device)
                        for _ in range(2 if self.cuda else 0)]
        # device buffers the forward writes into (on the CPU it writes into the host slots instead)
        self.dev = [torch.empty((n_loc, b, t, d), dtype=self.storage_dtype, device=self.device)
                    for _ in range(2 if self.cuda else 0)]
        self.dev_free = [None, None]  # CUDA events: the copy out of dev[k] finished
        self.pix_free = [None, None]  # CUDA events: the copy of pixels[k] to the device finished
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        acts_shape = (0, b, t, d) if self.fp8 and self.cuda else (n_loc, b, t, d)  # fp8 on CUDA: codes cross the bus
        self.slots = [
            _Slot(torch.empty(acts_shape, dtype=self.storage_dtype, pin_memory=pin),
                  torch.empty((b,), dtype=torch.bool, pin_memory=pin),
                  torch.empty((n_loc, 2, 3, d), dtype=torch.float64, pin_memory=pin),
                  torch.empty((n_loc, 2), dtype=torch.int64, pin_memory=pin),
                  *((torch.empty((n_loc, b, t, d), dtype=torch.uint8, pin_memory=pin),
                     torch.empty((n_loc, b, t), dtype=torch.float32, pin_memory=pin),
                     torch.empty((n_loc, b, len(ERROR_FIGURES)), dtype=torch.float64, pin_memory=pin)) if self.fp8 else ()))
            for _ in range(HOST_SLOTS)
        ]
        # full batches: the device work of buffer k captured once as a CUDA graph (device_graph.py)
        self.graphs = ([CapturedStep(lambda k=k: self._device_work(self.pix_dev[k], self.dev[k], b), self.device)
                        for k in range(2)] if cuda_graph else None)
        self.free_slots: queue.Queue[int] = queue.Queue()  # filled by run(), for each shard
        self.bytes_written = 0
        self.counts: dict[str, int] = {}
        # where the time goes (main thread: waiting for decoded images, for a free host slot;
        # writer thread: waiting for the device copy, writing)
        self.stage_seconds = {"wait_decode": 0.0, "wait_device": 0.0, "wait_writer": 0.0, "run_batch": 0.0,
                              "writer_wait_device": 0.0, "writer_write": 0.0}

    # ------------------------------------------------------------------ one shard
    def run(self, shard: InputShard) -> dict:
        """Harvest one input shard and commit it; on a failure anywhere, stop, leave it uncommitted
        (its claim released) and raise (see the module's doc)."""
        try:
            writer = self.store.writer(shard.name, compute_stats=False, check_finite=False, **self.writer_options)
        except Exception as exc:
            _raise_failure(shard, "write", exc)
        with writer:
            work: queue.Queue = queue.Queue(maxsize=len(self.slots))
            self.free_slots = queue.Queue()  # every slot is free again, whatever a failed shard left
            for i in range(len(self.slots)):
                self.free_slots.put(i)
            failure = _Failure()
            thread = threading.Thread(target=self._write_loop, args=(writer, work, self.free_slots, failure),
                                      daemon=True)
            thread.start()
            counts: dict[str, int] = {}
            decoded = None
            try:
                decoded = self.pool.imap(shard.samples())
                self._feed(shard, decoded, work, failure, counts)
                self._hand_over(work, None, failure)
                if not failure:
                    thread.join()  # the writer finishes what is queued (or drains it, should it fail)
                if not failure:
                    failure.now = "write"
                    commit = writer.commit()
            except BaseException as exc:
                failure.set(failure.now, exc)
            if failure:
                if hasattr(decoded, "close"):
                    decoded.close()
                self._stop_writer(work, thread)
                _raise_failure(shard, failure.stage, failure.exc)  # leaving the `with`: the writer stops, uncommitted
        for key, v in counts.items():
            self.counts[key] = self.counts.get(key, 0) + v
        nonfinite = commit["by_status"].get(NONFINITE, 0)
        if nonfinite:
            counts["ok"] = counts.get("ok", 0) - nonfinite
            counts[NONFINITE] = nonfinite
            self.counts["ok"] -= nonfinite
            self.counts[NONFINITE] = self.counts.get(NONFINITE, 0) + nonfinite
        return {"shard": shard.name, "stored": commit["n_rows"], "by_status": commit["by_status"], "decode": counts}

    def _feed(self, shard: InputShard, decoded, work: queue.Queue, failure: _Failure, counts: dict) -> None:
        """The main thread's part: decoded samples into batches, batches through the model, results
        and dropped images to the writer thread; stops as soon as any stage has failed."""
        k = 0  # which pixel / device buffer
        fill = 0
        records: list[ImageRecord] = []
        while True:
            failure.now = "decode"
            t = time.perf_counter()
            item = next(decoded, None)
            self.stage_seconds["wait_decode"] += time.perf_counter() - t
            if failure or item is None:
                break
            sample, dec = item
            rec = ImageRecord(key=sample.key, url=sample.url, caption=sample.caption, width=dec.width,
                              height=dec.height, source_shard=shard.name, source_row=sample.source_row,
                              status=dec.status, error=dec.error, data_url=sample.data_url,
                              data_offset=sample.data_offset, data_size=sample.data_size)
            counts[dec.status] = counts.get(dec.status, 0) + 1
            if dec.converted_from:
                key = f"converted_from_{dec.converted_from}"
                counts[key] = counts.get(key, 0) + 1
            if dec.pixels is None:
                self._hand_over(work, ("dropped", [rec]), failure)
                if self.progress is not None:
                    self.progress.update(1)
                continue
            if fill == 0 and self.pix_free[k] is not None:
                t = time.perf_counter()
                self.pix_free[k].synchronize()  # its previous batch has left for the device
                self.stage_seconds["wait_device"] += time.perf_counter() - t
            self.pixels[k][fill].numpy()[...] = dec.pixels
            records.append(rec)
            fill += 1
            if fill == self.batch_size:
                failure.now = "forward"
                t = time.perf_counter()
                self._run_batch(k, fill, records, work, failure)
                self.stage_seconds["run_batch"] += time.perf_counter() - t
                k, fill, records = 1 - k, 0, []
        if fill and not failure:
            failure.now = "forward"
            self._run_batch(k, fill, records, work, failure)

    @staticmethod
    def _hand_over(work: queue.Queue, item, failure: _Failure) -> None:
        """Queue an item for the writer thread; gives up (the item is not needed) once a stage failed."""
        while not failure:
            try:
                work.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    @staticmethod
    def _stop_writer(work: queue.Queue, thread: threading.Thread, patience_s: float = 60.0) -> None:
        """After a failure: tell the writer thread to end (it drains the queue without writing) and
        give it a while to finish the write it is in; it is a daemon, so it never holds the process."""
        deadline = time.monotonic() + patience_s
        while thread.is_alive() and time.monotonic() < deadline:
            try:
                work.put(None, timeout=_POLL_S)
                break
            except queue.Full:
                continue
        thread.join(timeout=max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------ one batch
    def _free_slot(self, failure: _Failure) -> int | None:
        """A host slot back from the writer thread (None once any stage has failed)."""
        t = time.perf_counter()
        slot_i = None
        while slot_i is None:
            if failure:
                return None
            try:
                slot_i = self.free_slots.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        self.stage_seconds["wait_writer"] += time.perf_counter() - t
        return slot_i

    def _run_batch(self, k: int, b: int, records: list[ImageRecord], work: queue.Queue, failure: _Failure) -> None:
        slot_i = None
        if self.cuda:
            dev = self.dev[k]
        else:  # on the CPU the forward writes straight into a host slot: a copy of every value less
            slot_i = self._free_slot(failure)
            if slot_i is None:
                return
            dev = self.slots[slot_i].acts
        if self.cuda and self.dev_free[k] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.dev_free[k])
        if self.cuda:
            x = self.pix_dev[k][:b]
            x.copy_(self.pixels[k][:b], non_blocking=True)
            self.pix_free[k] = torch.cuda.Event()
            self.pix_free[k].record(torch.cuda.current_stream(self.device))
        else:
            x = self.pixels[k][:b]
        replayed = self.graphs is not None and b == self.batch_size
        if replayed:
            if self.graphs[k].graph is None:
                self._capture_graphs()
            out = self.graphs[k]()
        else:
            out = self._device_work(x, dev, b)
        acts = dev[:, :b]
        if self.fp8:
            stats, counts, bad, codes, scales, errors = out
        else:
            stats, counts, bad = out
        if slot_i is None:
            slot_i = self._free_slot(failure)
            if slot_i is None:
                return
        slot = self.slots[slot_i]
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
            self.copy_stream.wait_event(ready)
            if not replayed:  # made on the compute stream, read on the copy stream, then freed
                # (a graph's outputs are never freed: they live in its pool until the next replay)
                for t in (stats, counts, bad, *((codes, scales, errors) if self.fp8 else ())):
                    t.record_stream(self.copy_stream)
            with torch.cuda.stream(self.copy_stream):
                if self.fp8:
                    slot.codes[:, :b].copy_(codes, non_blocking=True)
                    slot.scales[:, :b].copy_(scales, non_blocking=True)
                    slot.errors[:, :b].copy_(errors, non_blocking=True)
                else:
                    slot.acts[:, :b].copy_(acts, non_blocking=True)
                slot.bad[:b].copy_(bad, non_blocking=True)
                slot.stats.copy_(stats, non_blocking=True)
                slot.counts.copy_(counts, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.copy_stream)
            slot.done = done
            self.dev_free[k] = done
        else:  # the activations are in the slot already
            # numpy's copies, not torch's: a torch copy of more than 32 K values runs as an OpenMP team,
            # which waits for cores the writer threads hold (measured: 5 ms for each 400 KB copy of the
            # statistics while the writer writes)
            pairs = [(slot.bad[:b], bad), (slot.stats, stats), (slot.counts, counts)]
            if self.fp8:
                pairs += [(slot.codes[:, :b], codes), (slot.scales[:, :b], scales), (slot.errors[:, :b], errors)]
            for dst, src in pairs:
                dst.numpy()[...] = src.numpy()
        self._hand_over(work, ("batch", slot_i, b, records), failure)

    def _capture_graphs(self) -> None:
        """Both device buffers' graphs at once, at the first full batch (timed apart, as start-up):
        each capture's warm-ups write its device buffer, so any copy out of one still running is
        waited for first."""
        t = time.perf_counter()
        current = torch.cuda.current_stream(self.device)
        for ev in self.dev_free:
            if ev is not None:
                current.wait_event(ev)
        for g in self.graphs:
            if g.graph is None:
                g.capture()
        self.stage_seconds["capture_graphs"] = self.stage_seconds.get("capture_graphs", 0.0) + time.perf_counter() - t

    def _device_work(self, x: torch.Tensor, dev: torch.Tensor, b: int) -> tuple:
        """The device's part of a batch: pixels `x` (b, H, W, 3) through the model, each requested
        block's output cast into `dev[:, :b]`, then (stats, counts, bad), and for fp8 also (codes,
        scales, errors). Device work only (CUDA: no host sync, no copy from the host), so that a
        full batch's can be captured as a graph."""
        loc_index = self.loc_index

        def sink(layer: int, tokens: torch.Tensor) -> None:
            dev[loc_index[layer], :b].copy_(tokens)  # the cast to the storage dtype happens here

        self.model.forward(self.model.normalize(x), sink)
        acts = dev[:, :b]
        if self.fp8:  # quantised where the values are; statistics and error of the stored values
            codes, scales = quantize_fp8(acts)
            stored = dequantize_fp8(codes, scales)
            stats, counts, _ = _device_moments(stored, check_finite=False)
            errors = error_figures(acts, stored, keep=2)  # per location and image
            bad = ~torch.isfinite(scales).all(dim=2).all(dim=0)  # a NaN or inf makes its token's scale so
            return stats, counts, bad, codes, scales, errors
        return _device_moments(acts)

    # ------------------------------------------------------------------ writer thread
    def _write_loop(self, writer, work: queue.Queue, free_slots: queue.Queue, failure: _Failure) -> None:
        """Hands queued batches to the shard writer until None; after a failure anywhere it keeps
        taking items (so the main thread never blocks on a full queue or a missing slot) and
        frees their slots without writing them. A batch's chunks are queued to the writer's threads
        without waiting for them (`add(wait=False)`); its slot is freed once they have landed, after
        the next batch is queued, so the threads go on writing between batches instead of draining."""
        landing: collections.deque = collections.deque()  # (pending writes, slot, images) not yet waited for

        def land(keep: int) -> None:
            while len(landing) > keep:
                pending, slot_i, b = landing.popleft()
                t = time.perf_counter()
                try:
                    if pending is not None:
                        pending.wait()
                finally:
                    free_slots.put(slot_i)
                    self.stage_seconds["writer_write"] += time.perf_counter() - t
                if self.progress is not None:
                    self.progress.update(b)

        while True:
            item = work.get()
            if item is None or failure:
                try:
                    land(0)  # no write of ours may still read a slot that goes back to the main thread
                except BaseException as exc:  # noqa: BLE001 - the first failure is the one reported
                    failure.set("write", exc)
                if item is None:
                    return
                if item[0] == "batch":
                    free_slots.put(item[1])
                continue
            try:
                if item[0] == "dropped":
                    writer.add_dropped(item[1])
                    continue
                _, slot_i, b, records = item
                slot = self.slots[slot_i]
                t = time.perf_counter()
                try:
                    if slot.done is not None:
                        slot.done.synchronize()
                    t1 = time.perf_counter()
                    landing.append((self._write_batch(writer, slot, b, records), slot_i, b))
                except BaseException:
                    free_slots.put(slot_i)
                    raise
                self.stage_seconds["writer_wait_device"] += t1 - t
                self.stage_seconds["writer_write"] += time.perf_counter() - t1
                land(1)
            except BaseException as exc:  # raised by the main thread
                failure.set("write", exc)

    def _write_batch(self, writer, slot: _Slot, b: int, records: list[ImageRecord]):
        """The batch of a slot to the writer: its PendingWrites (None when nothing is left in flight)."""
        if self.fp8:
            return self._write_fp8_batch(writer, slot, b, records)
        acts = slot.acts[:, :b]
        bad = slot.bad[:b].numpy()
        if bad.any():
            # a NaN/inf activation (fp16 overflow, say): drop those images; recompute statistics here
            keep, records = self._drop_nonfinite(writer, bad, records)
            if not len(keep):
                return None
            acts = acts[:, torch.from_numpy(keep)]
            stats, counts, _ = _device_moments(acts)
        else:
            stats, counts = slot.stats, slot.counts
        arrays = {}
        for li, loc in enumerate(self.locations):
            a = acts[li]
            arrays[loc] = (a.view(torch.int16).numpy().view(np.uint16) if a.dtype == torch.bfloat16 else a.numpy())
        return self._add(writer, arrays, records, stats, counts)

    def _write_fp8_batch(self, writer, slot: _Slot, b: int, records: list[ImageRecord]):
        """fp8: the codes and scales made on the device, their statistics, and the error measured there."""
        codes, scales, errors = slot.codes[:, :b], slot.scales[:, :b], slot.errors[:, :b]
        bad = slot.bad[:b].numpy()
        if bad.any():
            keep, records = self._drop_nonfinite(writer, bad, records)
            if not len(keep):
                return None
            rows = torch.from_numpy(keep)
            codes, scales, errors = codes[:, rows], scales[:, rows], errors[:, rows]
            stats, counts, _ = _device_moments(dequantize_fp8(codes, scales), check_finite=False)
        else:
            stats, counts = slot.stats, slot.counts
        arrays = {loc: Quantized(codes[li].numpy(), scales[li].numpy()) for li, loc in enumerate(self.locations)}
        pending = self._add(writer, arrays, records, stats, counts)
        e = errors.numpy()  # per image: maxima and sums over the images kept
        writer.add_lossy_error({loc: dict(zip(ERROR_FIGURES, (float(e[li, :, 0].max()), float(e[li, :, 1].max()),
                                                              float(e[li, :, 2].sum()), float(e[li, :, 3].sum()))))
                                for li, loc in enumerate(self.locations)})
        return pending

    @staticmethod
    def _drop_nonfinite(writer, bad: np.ndarray, records: list[ImageRecord]) -> tuple[np.ndarray, list[ImageRecord]]:
        """Record the images whose activations are NaN or inf as dropped; the rows and records kept."""
        keep = np.flatnonzero(~bad)
        dropped = [records[i] for i in np.flatnonzero(bad)]
        for r in dropped:
            r.status, r.error = NONFINITE, "NaN or inf in the activations (try --dtype fp32 / bf16 compute)"
        writer.add_dropped(dropped)
        return keep, [records[i] for i in keep]

    def _add(self, writer, arrays: dict, records: list[ImageRecord], stats: torch.Tensor, counts: torch.Tensor):
        moments = {
            loc: {g: Moments.from_array(int(counts[li, gi]), stats[li, gi].numpy()) for gi, g in enumerate(MOMENT_GROUPS)}
            for li, loc in enumerate(self.locations)
        }
        pending = writer.add(arrays, records, moments=moments, wait=False)
        kill_point("harvest_batch")  # crash tests: die with the batch handed over, the shard uncommitted
        self.bytes_written += sum(a.codes.nbytes + a.scales.nbytes if isinstance(a, Quantized) else a.nbytes
                                  for a in arrays.values())
        now = time.perf_counter()
        if self._t_first is None:
            self._t_first = now  # steady state: from the first batch written on
        else:
            self.images_after_first += len(records)
        self._t_last = now
        if self.progress is not None:
            self.progress.set_postfix_str(f"{self.bytes_written / 1e6 / max(1e-9, time.perf_counter() - self._t0):.0f} MB/s written", refresh=False)
        return pending

    def start_clock(self) -> None:
        self._t0 = time.perf_counter()
        self._t_first = self._t_last = None
        self.images_after_first = 0

    @property
    def steady_images_per_s(self) -> float | None:
        """Images/s after the first batch (excludes start-up: first decodes, kernel warm-up)."""
        if self._t_first is None or self._t_last == self._t_first:
            return None
        return self.images_after_first / (self._t_last - self._t_first)


def _device_moments(acts: torch.Tensor, check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-batch statistics of (n_loc, B, T, D) stored values, on their device: per channel mean,
    M2 and absmax of the CLS and the patch tokens, and per-image finiteness. Host-side merging
    across batches is float64 (Moments.merge).

    Why it is written this way (measured on the CPU, fp16, 32 x 257 x 1024): float64 sums cost 7x a
    float32 mean (whose pairwise summation is exact enough per batch: ~1e-7 relative, and M2 is
    summed centred); elementwise ops on fp16 are slow on CPUs, so each group is converted to float32
    once; and on the CPU finiteness is read off the statistics (a NaN or inf in a group makes its
    mean or absmax non-finite), looking at single images only when one is, instead of scanning
    every value again. On CUDA that check would sync the host, so the scan stays on the device."""
    n_loc, b, t, d = acts.shape
    stats = torch.empty((n_loc, 2, 3, d), dtype=torch.float64, device=acts.device)
    counts = device_constant(("moment_counts", n_loc, b, t, acts.device),  # never written: slots get copies
                             lambda: torch.tensor([[b, b * (t - 1)]] * n_loc, dtype=torch.int64, device=acts.device))
    for li in range(n_loc):
        a = acts[li]
        for gi, g in enumerate((a[:, 0, :], a[:, 1:, :])):
            g = g.reshape(-1, d).float()  # float32; for fp32 storage this may be the stored values: never in place
            mean = g.mean(dim=0)
            stats[li, gi, 0] = mean
            stats[li, gi, 2] = torch.maximum(g.amax(dim=0), g.amin(dim=0).neg())
            stats[li, gi, 1] = (g - mean).square_().sum(dim=0)
    if check_finite and (acts.is_cuda or not bool(torch.isfinite(stats).all())):
        bad = ~torch.isfinite(acts).flatten(2).all(dim=2).all(dim=0)
    else:
        bad = torch.zeros(b, dtype=torch.bool, device=acts.device)
    return stats, counts, bad
