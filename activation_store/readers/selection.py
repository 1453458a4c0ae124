"""Which tokens of each image a reader serves, and where they are read from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from activation_store.errors import ConfigError


@dataclass(frozen=True)
class TokenSelection:
    """`tokens` of a reader, resolved against a store.

    cls_only: read the small CLS array, never the patch tokens.
    indices: token positions taken from each image of the main array (None = all of them).
    stats_group: which of the store's statistics describe these tokens ('all', 'cls', 'patches').
    """

    name: str
    cls_only: bool
    indices: np.ndarray | None
    per_image: int
    stats_group: str

    @classmethod
    def resolve(cls, tokens, n_tokens: int) -> TokenSelection:
        if isinstance(tokens, str):
            if tokens == "all":
                return cls("all", False, None, n_tokens, "all")
            if tokens == "cls":
                return cls("cls", True, None, 1, "cls")
            if tokens == "patches":
                return cls("patches", False, np.arange(1, n_tokens), n_tokens - 1, "patches")
            raise ConfigError(f"tokens must be 'all', 'cls', 'patches' or a list of token indices, got {tokens!r}")
        idx = np.unique(np.asarray(list(tokens), dtype=np.int64))
        if idx.size == 0 or idx.min() < 0 or idx.max() >= n_tokens:
            raise ConfigError(f"token indices must be within [0, {n_tokens}), got {list(tokens)[:10]}")
        if idx.tolist() == [0]:
            return cls("cls", True, None, 1, "cls")
        if idx.size == n_tokens:
            return cls("all", False, None, n_tokens, "all")
        group = "patches" if idx.min() >= 1 else "all"
        return cls(f"{idx.size} tokens", False, idx, int(idx.size), group)

    def token_index(self) -> np.ndarray:
        """The token position of each served token of one image."""
        if self.cls_only:
            return np.zeros(1, dtype=np.int64)
        return self.indices if self.indices is not None else np.arange(self.per_image)
