"""Streaming per-channel statistics, mergeable exactly across writers (Chan et al.'s parallel
Welford update, in float64)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Moments:
    """count, per-channel mean, per-channel sum of squared deviations (M2), per-channel max |x|."""

    d: int
    count: int = 0
    mean: np.ndarray = field(default=None)  # type: ignore[assignment]
    m2: np.ndarray = field(default=None)  # type: ignore[assignment]
    absmax: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        for name in ("mean", "m2", "absmax"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(self.d, dtype=np.float64))

    @classmethod
    def of(cls, x: np.ndarray) -> Moments:
        """Moments of the rows of `x` (any shape ending in d), by a two-pass computation."""
        x = np.asarray(x)
        d = x.shape[-1]
        rows = x.reshape(-1, d)
        n = rows.shape[0]
        if n == 0:
            return cls(d)
        mean = rows.sum(axis=0, dtype=np.float64) / n
        dev = rows.astype(np.float64) - mean
        m2 = np.einsum("ij,ij->j", dev, dev)
        absmax = np.abs(rows).max(axis=0).astype(np.float64)
        return cls(d, n, mean, m2, absmax)

    def merge(self, other: Moments) -> Moments:
        """Merge `other` into self (in place) and return self."""
        if other.count == 0:
            return self
        if self.count == 0:
            self.count, self.mean, self.m2 = other.count, other.mean.copy(), other.m2.copy()
            self.absmax = other.absmax.copy()
            return self
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / n)
        self.m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / n)
        self.absmax = np.maximum(self.absmax, other.absmax)
        self.count = n
        return self

    def add(self, x: np.ndarray) -> Moments:
        return self.merge(Moments.of(x))

    @property
    def var(self) -> np.ndarray:
        """Population variance per channel."""
        return self.m2 / self.count if self.count else np.zeros(self.d)

    @property
    def mean_sq_norm(self) -> float:
        """E||x||^2 = sum over channels of (var + mean^2)."""
        return float((self.var + self.mean**2).sum()) if self.count else 0.0

    @property
    def max_abs(self) -> float:
        return float(self.absmax.max()) if self.count else 0.0

    def to_array(self) -> np.ndarray:
        """(3, d) float64: mean, m2, absmax; the count travels separately."""
        return np.stack([self.mean, self.m2, self.absmax])

    @classmethod
    def from_array(cls, count: int, arr: np.ndarray) -> Moments:
        arr = np.asarray(arr, dtype=np.float64)
        return cls(arr.shape[-1], int(count), arr[0].copy(), arr[1].copy(), arr[2].copy())

    def summary(self) -> dict:
        return {
            "count": self.count,
            "mean_sq_norm": self.mean_sq_norm,
            "mean_norm_of_mean": float(np.linalg.norm(self.mean)),
            "mean_var": float(self.var.mean()) if self.count else 0.0,
            "max_abs": self.max_abs,
        }
