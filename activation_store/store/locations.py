"""Hook locations: `(layer, kind)` with the string form `resid_22`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from activation_store.errors import ConfigError

KINDS = ("resid",)
_PATTERN = re.compile(r"^(?P<kind>[a-z]+)_(?P<layer>\d+)$")


@dataclass(frozen=True, order=True)
class HookLocation:
    """Post-block residual stream of 0-indexed block `layer` (CLIP-Scope's and HF
    `hidden_states[layer + 1]`)."""

    layer: int
    kind: str = "resid"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown hook kind {self.kind!r}; known kinds: {', '.join(KINDS)}")
        if self.layer < 0:
            raise ConfigError(f"layer must be >= 0, got {self.layer}")

    def __str__(self) -> str:
        return f"{self.kind}_{self.layer}"

    @classmethod
    def parse(cls, value: str | int | tuple | HookLocation) -> HookLocation:
        if isinstance(value, HookLocation):
            return value
        if isinstance(value, int):
            return cls(value)
        if isinstance(value, tuple):
            return cls(int(value[0]), str(value[1]))
        m = _PATTERN.match(str(value).strip())
        if m is None:
            if str(value).strip().isdigit():
                return cls(int(value))
            raise ConfigError(f"cannot parse hook location {value!r}; write it as 'resid_22' or 22")
        return cls(int(m["layer"]), m["kind"])


def parse_locations(values) -> list[HookLocation]:
    """Parse `"2,5,resid_8"` or an iterable into sorted unique locations."""
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    locs = sorted({HookLocation.parse(v) for v in values})
    if not locs:
        raise ConfigError("at least one hook location is required")
    return locs
