"""The harvest: input shards -> decode workers -> ViT forward with hooks -> the store.

Overlap, on a GPU: decode runs in worker processes; pixels go to pinned host memory and to the
device without blocking; the hooks copy each requested block's output into a preallocated
device buffer in the storage dtype; statistics and finiteness are computed there; a separate
copy stream moves the buffer into pinned host slots while the next batch runs; a writer thread
hands the slots to the shard writer, which encodes and writes whole chunks in its own threads.
Two device buffers and a ring of host slots keep every stage busy. On the CPU the same code runs
with plain copies."""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from activation_store.faults import kill_point
from activation_store.harvest.decode import Decoded, decode_image
from activation_store.harvest.model import LoadedViT
from activation_store.harvest.sources import InputShard, Sample
from activation_store.store import ImageRecord
from activation_store.store.layout import MOMENT_GROUPS
from activation_store.store.stats import Moments

STORAGE_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
NONFINITE = "nonfinite_activation"

_worker_transform = None
_worker_min_size = 2


def _init_worker(transform, min_size: int, in_child: bool = True) -> None:
    global _worker_transform, _worker_min_size
    _worker_transform, _worker_min_size = transform, min_size
    if in_child:
        torch.set_num_threads(1)  # decoding needs no torch threads; they would compete with the forward


def _decode_task(sample: Sample) -> tuple[Sample, Decoded]:
    if sample.status is not None:  # known bad before decoding (a truncated tar, an unreadable file)
        return sample, Decoded(None, sample.status, sample.error)
    decoded = decode_image(sample.data, _worker_transform, _worker_min_size)
    sample.data = None  # do not ship the bytes back
    return sample, decoded


class DecodePool:
    """Ordered parallel decoding: results come back in sample order, whatever the worker count."""

    def __init__(self, transform, workers: int, min_size: int, use_fork: bool) -> None:
        self.workers = workers
        if workers > 0:
            ctx = mp.get_context("fork" if use_fork else "spawn")
            self.pool = ctx.Pool(workers, initializer=_init_worker, initargs=(transform, min_size))
        else:
            _init_worker(transform, min_size, in_child=False)
            self.pool = None

    def warm_up(self) -> None:
        """Wait until every worker process is up (spawned workers import torch: seconds)."""
        if self.pool is not None:
            self.pool.map(time.sleep, [0.05] * (2 * self.workers), chunksize=1)

    def imap(self, samples):
        if self.pool is None:
            return map(_decode_task, samples)
        return self.pool.imap(_decode_task, samples, chunksize=4)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


@dataclass
class _Slot:
    """Pinned host memory for one batch: activations, per-image finiteness, statistics."""

    acts: torch.Tensor  # (n_locations, B, T, D) storage dtype
    bad: torch.Tensor  # (B,) bool
    stats: torch.Tensor  # (n_locations, 2, 3, D) float64: mean, M2, absmax per token group
    counts: torch.Tensor  # (n_locations, 2) int64
    done: torch.cuda.Event | None = None


class ShardRunner:
    """Runs the model over input shards and writes them, one shard writer at a time."""

    def __init__(self, model: LoadedViT, store, batch_size: int, pool: DecodePool, progress: tqdm | None) -> None:
        self.model, self.store, self.batch_size, self.pool, self.progress = model, store, batch_size, pool, progress
        self.locations = store.locations
        self.loc_index = {int(loc.split("_")[1]): i for i, loc in enumerate(self.locations)}
        self.device = model.device
        self.cuda = self.device.type == "cuda"
        self.storage_dtype = STORAGE_TORCH_DTYPES[store.dtype]
        n_loc, b, t, d = len(self.locations), batch_size, store.n_tokens, store.d_model
        h, w = model.preprocess["image_size"]
        pin = self.cuda
        self.pixels = [torch.empty((b, h, w, 3), dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self.dev = [torch.empty((n_loc, b, t, d), dtype=self.storage_dtype, device=self.device) for _ in range(2)]
        self.dev_free = [None, None]  # CUDA events: the copy out of dev[k] finished
        self.pix_free = [None, None]  # CUDA events: the copy of pixels[k] to the device finished
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        n_slots = 3
        self.slots = [
            _Slot(torch.empty((n_loc, b, t, d), dtype=self.storage_dtype, pin_memory=pin),
                  torch.empty((b,), dtype=torch.bool, pin_memory=pin),
                  torch.empty((n_loc, 2, 3, d), dtype=torch.float64, pin_memory=pin),
                  torch.empty((n_loc, 2), dtype=torch.int64, pin_memory=pin))
            for _ in range(n_slots)
        ]
        self.free_slots: queue.Queue[int] = queue.Queue()
        for i in range(n_slots):
            self.free_slots.put(i)
        self.bytes_written = 0
        self.counts: dict[str, int] = {}
        # where the time goes (main thread: waiting for decoded images, for a free host slot;
        # writer thread: waiting for the device copy, writing)
        self.stage_seconds = {"wait_decode": 0.0, "wait_device": 0.0, "wait_writer": 0.0, "run_batch": 0.0,
                              "writer_wait_device": 0.0, "writer_write": 0.0}

    # ------------------------------------------------------------------ one shard
    def run(self, shard: InputShard) -> dict:
        writer = self.store.writer(shard.name, compute_stats=False, check_finite=False)
        work: queue.Queue = queue.Queue(maxsize=len(self.slots))
        errors: list[BaseException] = []
        thread = threading.Thread(target=self._write_loop, args=(writer, work, errors), daemon=True)
        thread.start()
        counts: dict[str, int] = {}
        k = 0  # which pixel / device buffer
        fill = 0
        records: list[ImageRecord] = []
        try:
            decoded = iter(self.pool.imap(shard.samples()))
            while True:
                t = time.perf_counter()
                item = next(decoded, None)
                self.stage_seconds["wait_decode"] += time.perf_counter() - t
                if item is None:
                    break
                sample, dec = item
                if errors:
                    raise errors[0]
                rec = ImageRecord(key=sample.key, url=sample.url, caption=sample.caption, width=dec.width,
                                  height=dec.height, source_shard=shard.name, source_row=sample.source_row,
                                  status=dec.status, error=dec.error)
                counts[dec.status] = counts.get(dec.status, 0) + 1
                if dec.converted_from:
                    key = f"converted_from_{dec.converted_from}"
                    counts[key] = counts.get(key, 0) + 1
                if dec.pixels is None:
                    work.put(("dropped", [rec]))
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
                    t = time.perf_counter()
                    self._run_batch(k, fill, records, work)
                    self.stage_seconds["run_batch"] += time.perf_counter() - t
                    k, fill, records = 1 - k, 0, []
            if fill:
                self._run_batch(k, fill, records, work)
            work.put(None)
            thread.join()
            if errors:
                raise errors[0]
        except BaseException:
            work.put(None)
            thread.join(timeout=60)
            raise
        commit = writer.commit()
        for key, v in counts.items():
            self.counts[key] = self.counts.get(key, 0) + v
        nonfinite = commit["by_status"].get(NONFINITE, 0)
        if nonfinite:
            counts["ok"] = counts.get("ok", 0) - nonfinite
            counts[NONFINITE] = nonfinite
            self.counts["ok"] -= nonfinite
            self.counts[NONFINITE] = self.counts.get(NONFINITE, 0) + nonfinite
        return {"shard": shard.name, "stored": commit["n_rows"], "by_status": commit["by_status"], "decode": counts}

    # ------------------------------------------------------------------ one batch
    def _run_batch(self, k: int, b: int, records: list[ImageRecord], work: queue.Queue) -> None:
        model = self.model
        dev = self.dev[k]
        if self.cuda and self.dev_free[k] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.dev_free[k])
        x = self.pixels[k][:b].to(self.device, non_blocking=True)
        if self.cuda:
            self.pix_free[k] = torch.cuda.Event()
            self.pix_free[k].record(torch.cuda.current_stream(self.device))
        loc_index = self.loc_index

        def sink(layer: int, tokens: torch.Tensor) -> None:
            dev[loc_index[layer], :b].copy_(tokens)  # the cast to the storage dtype happens here

        model.forward(model.normalize(x), sink)
        acts = dev[:, :b]
        stats, counts, bad = _device_moments(acts)
        t = time.perf_counter()
        slot_i = self.free_slots.get()
        self.stage_seconds["wait_writer"] += time.perf_counter() - t
        slot = self.slots[slot_i]
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
            self.copy_stream.wait_event(ready)
            for t in (stats, counts, bad):  # made on the compute stream, read on the copy stream
                t.record_stream(self.copy_stream)
            with torch.cuda.stream(self.copy_stream):
                slot.acts[:, :b].copy_(acts, non_blocking=True)
                slot.bad[:b].copy_(bad, non_blocking=True)
                slot.stats.copy_(stats, non_blocking=True)
                slot.counts.copy_(counts, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.copy_stream)
            slot.done = done
            self.dev_free[k] = done
        else:
            slot.acts[:, :b].copy_(acts)
            slot.bad[:b].copy_(bad)
            slot.stats.copy_(stats)
            slot.counts.copy_(counts)
        work.put(("batch", slot_i, b, records))

    # ------------------------------------------------------------------ writer thread
    def _write_loop(self, writer, work: queue.Queue, errors: list) -> None:
        try:
            while True:
                item = work.get()
                if item is None:
                    return
                if errors:
                    continue
                if item[0] == "dropped":
                    writer.add_dropped(item[1])
                    continue
                _, slot_i, b, records = item
                slot = self.slots[slot_i]
                t = time.perf_counter()
                if slot.done is not None:
                    slot.done.synchronize()
                t1 = time.perf_counter()
                try:
                    self._write_batch(writer, slot, b, records)
                finally:
                    self.free_slots.put(slot_i)
                self.stage_seconds["writer_wait_device"] += t1 - t
                self.stage_seconds["writer_write"] += time.perf_counter() - t1
                if self.progress is not None:
                    self.progress.update(b)
        except BaseException as exc:  # surfaced by the main loop
            errors.append(exc)

    def _write_batch(self, writer, slot: _Slot, b: int, records: list[ImageRecord]) -> None:
        acts = slot.acts[:, :b]
        bad = slot.bad[:b].numpy()
        if bad.any():
            # a NaN/inf activation (fp16 overflow, say): drop those images; recompute statistics here
            keep = np.flatnonzero(~bad)
            dropped = [records[i] for i in np.flatnonzero(bad)]
            for r in dropped:
                r.status, r.error = NONFINITE, "NaN or inf in the activations (try --dtype fp32 / bf16 compute)"
            writer.add_dropped(dropped)
            records = [records[i] for i in keep]
            if not len(keep):
                return
            acts = acts[:, torch.from_numpy(keep)]
            stats, counts, _ = _device_moments(acts)
        else:
            stats, counts = slot.stats, slot.counts
        moments = {
            loc: {g: Moments.from_array(int(counts[li, gi]), stats[li, gi].numpy()) for gi, g in enumerate(MOMENT_GROUPS)}
            for li, loc in enumerate(self.locations)
        }
        arrays = {}
        for li, loc in enumerate(self.locations):
            a = acts[li]
            arrays[loc] = (a.view(torch.int16).numpy().view(np.uint16) if a.dtype == torch.bfloat16 else a.numpy())
        writer.add(arrays, records, moments=moments)
        kill_point("harvest_batch")  # crash tests: die with the batch handed over, the shard uncommitted
        self.bytes_written += sum(a.nbytes for a in arrays.values())
        now = time.perf_counter()
        if self._t_first is None:
            self._t_first = now  # steady state: from the first batch written on
        else:
            self.images_after_first += len(records)
        self._t_last = now
        if self.progress is not None:
            self.progress.set_postfix_str(f"{self.bytes_written / 1e6 / max(1e-9, time.perf_counter() - self._t0):.0f} MB/s written", refresh=False)

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


def _device_moments(acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-batch statistics of (n_loc, B, T, D) stored values, on their device: per channel mean,
    M2 and absmax of the CLS and the patch tokens (sums accumulated in float64), and per-image
    finiteness. Host-side merging across batches is float64 (Moments.merge)."""
    n_loc, b, t, d = acts.shape
    stats = torch.empty((n_loc, 2, 3, d), dtype=torch.float64, device=acts.device)
    counts = torch.empty((n_loc, 2), dtype=torch.int64, device=acts.device)
    bad = torch.zeros(b, dtype=torch.bool, device=acts.device)
    for li in range(n_loc):
        a = acts[li]
        bad |= ~torch.isfinite(a).flatten(1).all(dim=1)
        for gi, g in enumerate((a[:, 0, :], a[:, 1:, :].reshape(-1, d))):
            g = g.float()
            mean = g.sum(dim=0, dtype=torch.float64) / g.shape[0]
            dev = g - mean.float()
            stats[li, gi, 0] = mean
            stats[li, gi, 1] = (dev * dev).sum(dim=0, dtype=torch.float64)
            stats[li, gi, 2] = g.abs().amax(dim=0).double()
            counts[li, gi] = g.shape[0]
    return stats, counts, bad
