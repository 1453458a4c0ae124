"""Readers: shuffled and ordered batches of activations from a store (imports torch, never the
harvest or open_clip)."""

from activation_store.readers.normalize import Normalizer
from activation_store.readers.config import ReaderConfig
from activation_store.readers.readers import OrderedReader, ShuffledReader
from activation_store.readers.torch_dataset import ActivationDataset

__all__ = ["ActivationDataset", "Normalizer", "OrderedReader", "ReaderConfig", "ShuffledReader"]
