"""Names of everything inside a store, and the format version. docs/format.md is the spec."""

from __future__ import annotations

import re

FORMAT_VERSION = "1.1"  # 1.1 adds images_crc32c, moments_chunks, percent-encoded names, claims (docs/format.md)
FORMAT_MAJOR = 1

ROOT_ATTR = "activation_store"  # namespace of our root-group attributes
ARRAY_ATTR = "activation_store"  # namespace of our per-array attributes
SHARD_ATTR = "activation_store_shard"  # namespace of a shard group's attributes

CLS_GROUP = "cls"
SHARDS_GROUP = "shards"
MOMENT_GROUPS = ("cls", "patches")  # statistics are kept per token group; "all" is their merge

PLANNED, WRITING, COMMITTED = "planned", "writing", "committed"

# written first by a store's creation and removed last: a directory that holds it but no root zarr.json
# is a creation that was interrupted, which the next creation may finish (it lists what it writes)
CREATING_MARKER = ".activation_store_creating"
CLAIM = "writer.claim"  # in a shard group: the writer that holds the shard (see store/claims.py)
SHARD_DIR = re.compile(r"s\d{6,}")  # the folder names of shard groups


def array_key(location: str) -> str:
    return str(location)


def cls_array_key(location: str) -> str:
    return f"{CLS_GROUP}/{location}"


def shard_name(index: int) -> str:
    return f"s{index:06d}"


def shard_group_key(index: int) -> str:
    return f"{SHARDS_GROUP}/{shard_name(index)}"


def shard_images_key(index: int) -> str:
    return f"{shard_group_key(index)}/images.parquet"


def shard_moments_key(index: int) -> str:
    return f"{shard_group_key(index)}/moments"


def node_key(path: str) -> str:
    """The metadata document of the group or array at `path`."""
    return f"{path}/zarr.json" if path else "zarr.json"


def chunk_key(array: str, index: int, ndim: int) -> str:
    """Zarr v3 default chunk key encoding ('/' separator); we chunk along axis 0 only."""
    return f"{array}/c/{index}" + "/0" * (ndim - 1)


def format_major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return -1
