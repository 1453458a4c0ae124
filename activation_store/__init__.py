"""activation-store: run the ViT once, store its activations in Zarr, read them back shuffled.

What a researcher reaches for is importable from here, lazily: `import activation_store` imports
neither torch nor zarr until a name that needs them is used."""

from __future__ import annotations

import importlib

from activation_store._version import __version__
from activation_store.errors import ActivationStoreError

# name -> module that defines it
_LAZY = {
    "open_store": "activation_store.store",
    "ActivationStore": "activation_store.store",
    "StoreConfig": "activation_store.store",
    "ImageRecord": "activation_store.store",
    "ShuffledReader": "activation_store.readers",
    "OrderedReader": "activation_store.readers",
    "ReaderConfig": "activation_store.readers",
    "TopKSAE": "activation_store.sae",
    "SAEConfig": "activation_store.sae",
    "load_sae": "activation_store.sae",
    "export_saelens": "activation_store.sae",
    "export_clipscope": "activation_store.sae",
    "train": "activation_store.sae.trainer",
    "TrainerConfig": "activation_store.sae.trainer",
    "evaluate": "activation_store.sae.evaluate",
    "EvalConfig": "activation_store.sae.evaluate",
}

__all__ = ["ActivationStoreError", "__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'activation_store' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
