"""Names of everything inside a store, and the format version. docs/format.md is the spec."""

from __future__ import annotations

import re

FORMAT_VERSION = "1.1"  # 1.1 adds images_crc32c, moments_chunks, percent-encoded names, claims (docs/format.md)
FORMAT_MAJOR = 1
# 2.0 is 1.1 plus the fp8 dtype (codes + a companion scale array), which a 1.x reader would misread:
# only stores of that dtype are 2.0, so every other store stays readable by 1.x software
FORMAT_VERSION_QUANTIZED = "2.0"
KNOWN_MAJORS = (1, 2)  # the MAJOR versions this software reads (a reader refuses any other)

ROOT_ATTR = "activation_store"  # namespace of our root-group attributes
ARRAY_ATTR = "activation_store"  # namespace of our per-array attributes
SHARD_ATTR = "activation_store_shard"  # namespace of a shard group's attributes

CLS_GROUP = "cls"
SHARDS_GROUP = "shards"
SCALES_GROUP = "scales"  # fp8 stores: the per-token scales of every main and CLS array (format 2.0)
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


def scale_array_key(array: str) -> str:
    """The companion array of per-token float32 scales of an fp8 array (main or CLS): scales/<key>."""
    return f"{SCALES_GROUP}/{array}"


def format_version_for(dtype: str) -> str:
    """The format version a new store of a storage dtype is written as."""
    return FORMAT_VERSION_QUANTIZED if dtype == "fp8" else FORMAT_VERSION


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


def check_format_version(version, url: str, software: str, known_majors: tuple[int, ...] = KNOWN_MAJORS) -> None:
    """StoreVersionError, telling the user to upgrade, for a store whose MAJOR version is not one of
    `known_majors` (a 1.x-only reader given `known_majors=(1,)` refuses an fp8 store, 2.0, so)."""
    from activation_store.errors import StoreVersionError

    major = format_major(version)
    if major not in known_majors:
        reads = " and ".join(f"{m}.x" for m in known_majors)
        raise StoreVersionError(
            f"{url} is activation-store format {version}, but this software (activation-store {software}) reads "
            f"format {reads} only; upgrade activation-store (pip install -U activation-store) to a version that "
            f"supports format {major}.x"
        )
