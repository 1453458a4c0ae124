"""Zarr metadata documents (`zarr.json`): made by zarr in memory, so they are exactly what zarr would
write, but written by us, atomically and in the order that keeps creation and planning restartable
(zarr would write parent groups, the root first, on its own); and read back with an error that names
the object, never a bare KeyError or JSONDecodeError."""

from __future__ import annotations

import json

import zarr
import zarr.storage

from activation_store.errors import StoreFormatError
from activation_store.store import layout


def group_document(attributes: dict | None = None) -> bytes:
    found: dict = {}
    zarr.create_group(zarr.storage.MemoryStore(store_dict=found), attributes=attributes or {})
    return found["zarr.json"].to_bytes()


def array_document(**create_array) -> bytes:
    """The zarr.json that `zarr.create_array(..., **create_array)` writes."""
    found: dict = {}
    zarr.create_array(zarr.storage.MemoryStore(store_dict=found), name="a", **create_array)
    return found["a/zarr.json"].to_bytes()


def shard_document(attrs: dict) -> bytes:
    """A shard group's zarr.json: its record under `activation_store_shard`. Plain JSON (non-UTF-8
    names, which Python keeps as surrogate escapes, are written as \\u escapes)."""
    doc = {"zarr_format": 3, "node_type": "group", "attributes": {layout.SHARD_ATTR: attrs}}
    return json.dumps(doc, indent=2).encode()


def parse_document(url: str, key: str, data: bytes | None, node_type: str, what: str) -> dict:
    """The metadata document stored at `key`, checked to be Zarr v3 metadata of a `node_type`;
    StoreFormatError naming the object otherwise."""
    where = f"{url}: {key} (the metadata of {what})"
    if data is None:
        raise StoreFormatError(f"{where} is missing; run `actstore verify {url}` to list what else is damaged")
    try:
        doc = json.loads(data)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise StoreFormatError(f"{where} is not valid JSON ({exc}); run `actstore verify {url}`") from exc
    if not isinstance(doc, dict) or doc.get("zarr_format") != 3 or doc.get("node_type") != node_type:
        raise StoreFormatError(f"{where} is not the Zarr v3 metadata of a {node_type}; run `actstore verify {url}`")
    return doc


def read_document(storage, key: str, node_type: str, what: str) -> dict:
    return parse_document(storage.url, key, storage.read_bytes(key, count=False), node_type, what)


def array_shape(doc: dict, key: str, url: str) -> list[int]:
    try:
        shape = [int(n) for n in doc["shape"]]
        chunks = [int(n) for n in doc["chunk_grid"]["configuration"]["chunk_shape"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreFormatError(f"{url}: {key} has no valid shape and chunk grid ({exc!r}); run `actstore verify {url}`") from exc
    if len(shape) != len(chunks):
        raise StoreFormatError(f"{url}: {key} has shape {shape} but chunks {chunks}; run `actstore verify {url}`")
    return shape


def grown_array_document(doc: dict, rows: int) -> bytes:
    """The document of an array grown along axis 0 to `rows` (nothing else changes: growing never
    deletes a chunk, unlike zarr's resize when it shrinks)."""
    doc = dict(doc, shape=[rows, *doc["shape"][1:]])
    return json.dumps(doc, indent=2).encode()
