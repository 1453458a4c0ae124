"""activation-store: run the ViT once, store its activations in Zarr, read them back shuffled."""

__version__ = "0.1.0"

from activation_store.errors import ActivationStoreError  # noqa: E402
from activation_store.store import ActivationStore, open_store  # noqa: E402

__all__ = ["ActivationStore", "ActivationStoreError", "OrderedReader", "ShuffledReader", "open_store", "__version__"]


def __getattr__(name: str):
    # the readers import torch: only when asked for, so store-only tools start fast
    if name in ("ShuffledReader", "OrderedReader"):
        from activation_store import readers

        return getattr(readers, name)
    raise AttributeError(f"module 'activation_store' has no attribute {name!r}")
