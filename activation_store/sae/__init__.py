"""Sparse autoencoders on stored activations (never imports the harvest or open_clip)."""

from activation_store.errors import CheckpointError
from activation_store.sae.config import SAEConfig
from activation_store.sae.model import TopKSAE, export_clipscope, export_saelens, load_clipscope, load_sae

__all__ = ["CheckpointError", "SAEConfig", "TopKSAE", "export_clipscope", "export_saelens", "load_clipscope", "load_sae"]
