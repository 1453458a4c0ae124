"""The device work of a full batch, captured once as a CUDA graph and then replayed once a batch
(`HarvestConfig.cuda_graph`).

Why: on an H200 the harvest ran at 0.27 of the bare forward with the device itself able to do
0.7-0.8 (docs/benchmarks.md, "Harvest"): the main thread spent its time launching the batch's
~600 small kernels (normalisation, 24 blocks, hook copies, statistics) from Python while other
threads took the GIL. Replaying a graph is one launch.

What is captured is exactly the function the eager path runs (ShardRunner._device_work), on
static buffers: the device pixel buffer it reads and the device activation buffer the hooks copy
into belong to the runner; the statistics (and fp8 codes, scales and errors) it returns are
allocated in the graph's private pool on capture and rewritten by every replay, so a graph's
outputs stay valid until its next replay (the runner replays graph k only after the copy of
batch k to the host has finished). Partial batches run eagerly. The capture runs the function
twice on a side stream first (cuBLAS and the allocator warm up outside the capture) and captures
in thread-local mode, so the writer thread's event waits are not capture violations. Nothing in
the function may synchronise the host or copy from pageable memory: the constants it needs are
made once, on first use, outside the capture (`device_constant`)."""

from __future__ import annotations

from typing import Callable

import torch

_CONSTANTS: dict[tuple, torch.Tensor] = {}


def device_constant(key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The tensor `make()` gives, made once per `key` (which names its device) and never written:
    a copy from the host is not allowed inside a captured CUDA graph, so the device work's
    constants are made on first use, which is a warm-up outside any capture."""
    t = _CONSTANTS.get(key)
    if t is None:
        t = _CONSTANTS[key] = make()
    return t


class CapturedStep:
    """`fn()` (CUDA work only, returning tensors) captured on the first call, replayed after."""

    WARMUPS = 2

    def __init__(self, fn: Callable[[], tuple], device: torch.device) -> None:
        self.fn, self.device = fn, device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple | None = None

    def __call__(self) -> tuple:
        if self.graph is None:
            self.capture()
        self.graph.replay()
        return self.outputs

    def capture(self) -> None:
        """Run `fn` WARMUPS times on a side stream, then capture it (its inputs need not hold
        anything meaningful yet: the warm-ups' results are overwritten by the first replay)."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)  # the inputs were written on the current stream
        with torch.cuda.stream(side):
            for _ in range(self.WARMUPS):
                self.fn()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = self.fn()
        self.graph, self.outputs = graph, outputs
