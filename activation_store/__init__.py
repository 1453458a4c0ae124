"""activation-store: run the ViT once, store its activations in Zarr, read them back shuffled."""

__version__ = "0.1.0"

from activation_store.errors import ActivationStoreError  # noqa: E402
from activation_store.store import ActivationStore, open_store  # noqa: E402

__all__ = ["ActivationStore", "ActivationStoreError", "open_store", "__version__"]
