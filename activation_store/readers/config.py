"""ReaderConfig: what a reader reads and how (one dataclass; readers, the trainer and the CLI use it)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from activation_store.configs import check_choice, comma_list, option
from activation_store.errors import ConfigError

OUTPUT_DTYPES = ("float32", "bfloat16", "float16")
NORMALIZE_MODES = ("none", "standardize", "unit_mean_sq_norm")
SPLITS = ("all", "train", "eval")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30, "t": 2**40, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$")


def parse_bytes(text) -> int | None:
    """A memory size: 1GB, 512MB, 2GiB, 1.5e9 (bytes), or 'none'."""
    if text is None or isinstance(text, int):
        return text
    if str(text).lower() == "none":
        return None
    m = _SIZE.match(str(text).lower())
    if not m or m.group(2) not in _UNITS:
        raise ConfigError(f"a memory size is a number with a unit, like 1GB, 512MB or 2GiB; got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def parse_tokens(text: str):
    """'all', 'cls', 'patches' or token indices '0,5,9'."""
    if text in ("all", "cls", "patches"):
        return text
    try:
        return comma_list(int)(text)
    except ValueError:
        raise ConfigError(f"tokens are all, cls, patches or token indices like 0,5,9; got {text!r}") from None


@dataclass
class ReaderConfig:
    """`epochs=None` reads forever (a new permutation every epoch)."""

    location: str | None = option(None, help="hook location to read, e.g. resid_22")
    tokens: object = option("all", help="all, cls, patches, or token indices 0,5,9", parse=parse_tokens)
    batch_size: int = option(4096, help="vectors per batch")
    buffer_tokens: int = option(2**19, help="tokens per window; two windows are held (one served, one loading)")
    seed: int = option(0, help="shuffle seed (the trainer also seeds the SAE's initialisation with it)")
    rank: int | None = option(None, help="this reader's rank (default: torch.distributed's, or 0)")
    world_size: int | None = option(None, help="number of ranks (default: torch.distributed's, or 1)")
    epochs: int | None = option(1, help="passes over the data; none reads forever", parse=lambda s: None
                                if s.lower() == "none" else int(s))
    dtype: str = option("float32", help="dtype of the yielded tensors", choices=OUTPUT_DTYPES)
    device: str = option("cpu", help="device of the batches (and of the SAE, in training): cpu, cuda, cuda:1 ...")
    normalize: str = option("none", help="normalisation from the store's statistics", choices=NORMALIZE_MODES)
    drop_last: bool = option(False, help="drop the last, smaller batch of each epoch")
    return_ids: bool = option(False, help="also yield (image_row, token_index) per vector")
    threads: int = option(4, help="chunk fetch/decode threads")
    gather_threads: int = option(0, help="threads that gather (and convert) batches out of the window; 0: one a "
                                         "core, at most 4")
    memory: int | None = option(None, flag="--reader-memory", parse=parse_bytes,
                                help="memory budget of the reader, like 1GB: sizes its two windows (instead of "
                                     "buffer_tokens) after its fixed buffers")
    io_concurrency: int = option(8, help="object stores: GETs in flight at once")
    prefetch: int = option(16, help="object stores: chunk objects fetched ahead of their decode, across windows "
                                    "(memory: this many chunk objects)")
    io_attempts: int = option(5, help="tries of one chunk read, with back-off between them, before ChunkReadError")
    io_timeout: float = option(60.0, help="object stores: seconds one GET may take before it is retried")
    readahead: bool = option(True, help="local disks: ask the kernel to read the first chunk files of the next "
                                        "window ahead (posix_fadvise WILLNEED)")
    shuffle: bool = option(True, help="shuffle (False: store order)")
    split: str = option("all", help="all images, or 'train'/'eval': images split by a fixed hash of their row",
                        choices=SPLITS)
    holdout: float = option(0.05, help="share of images held out of 'train' (and read by 'eval')")

    def __post_init__(self) -> None:
        if self.location is not None:
            self.location = str(self.location)
        if not isinstance(self.tokens, str):
            self.tokens = [int(t) for t in self.tokens]
        for name in ("batch_size", "buffer_tokens", "threads", "io_concurrency", "prefetch", "io_attempts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1 or None (forever), got {self.epochs}")
        if self.memory is not None:
            self.memory = parse_bytes(self.memory)
            if self.memory < 1:
                raise ConfigError(f"memory must be a positive size, got {self.memory}")
        if self.gather_threads < 0:
            raise ConfigError(f"gather_threads must be >= 0 (0: automatic), got {self.gather_threads}")
        if not self.io_timeout > 0:
            raise ConfigError(f"io_timeout must be > 0 seconds, got {self.io_timeout}")
        check_choice("dtype", self.dtype, OUTPUT_DTYPES)
        check_choice("normalize", self.normalize, NORMALIZE_MODES)
        check_choice("split", self.split, SPLITS)
        if not 0 <= self.holdout < 1:
            raise ConfigError(f"holdout must be in [0, 1), got {self.holdout}")
