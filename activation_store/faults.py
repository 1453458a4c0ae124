"""Deterministic kill points for crash tests: a process started with
`ACTSTORE_KILL_AT=<point>:<n>` kills itself with SIGKILL the n-th time it reaches `<point>`, so a
test kills a run at an exact place instead of after a sleep that a fast run outlives.

Points: `train_step` (after an optimiser step), `harvest_batch` (after a batch is handed to the
shard writer), `store_create` (after each object a store's creation writes: the creation marker, each
group and array, the root zarr.json), `store_plan` (after each array a planning step grows and each
shard group it writes), `atomic_write` (inside `Storage.write_bytes`, after the temporary object is
written and before it replaces the target), `convert_batch` (after `actstore convert` hands a batch to
the destination's shard writer). Unset, it costs one dict lookup."""

from __future__ import annotations

import os
import signal

ENV = "ACTSTORE_KILL_AT"
_seen: dict[str, int] = {}


def kill_point(point: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name != point:
        return
    _seen[point] = _seen.get(point, 0) + 1
    if _seen[point] >= int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)
