"""The on-disk format (v1): create, plan, write, read, verify. Imports no torch model code."""

from activation_store.store.activation_store import ActivationStore, ChunkRef, ShardInfo, open_store
from activation_store.store.config import StoreConfig
from activation_store.store.images import ImageRecord
from activation_store.store.locations import HookLocation, parse_locations
from activation_store.store.stats import Moments
from activation_store.store.writer import ShardWriter

__all__ = [
    "ActivationStore", "ChunkRef", "HookLocation", "ImageRecord", "Moments", "ShardInfo",
    "ShardWriter", "StoreConfig", "open_store", "parse_locations",
]
