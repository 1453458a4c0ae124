"""Sparse autoencoders on stored activations (never imports the harvest or open_clip)."""

from activation_store.sae.clipscope import CheckpointError, load_clipscope
from activation_store.sae.model import SAEConfig, TopKSAE

__all__ = ["CheckpointError", "SAEConfig", "TopKSAE", "load_clipscope"]
