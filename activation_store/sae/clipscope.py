"""CLIP-Scope checkpoints: `{L}_resid/{tokens}.pt` files holding `model_state_dict` {pre_b (d),
enc (d, n), dec (n, d)} and `k`, `n_features`, `d_in`. Their SAE has no encoder bias and no ReLU
after the top-k (latents may be negative)."""

from __future__ import annotations

from pathlib import Path

import torch

from activation_store.errors import ActivationStoreError
from activation_store.sae.model import TopKSAE


class CheckpointError(ActivationStoreError):
    """A checkpoint file is missing, unreadable, or not of the expected format."""


def load_clipscope(path: str | Path, device: str = "cpu") -> TopKSAE:
    """A TopKSAE that computes exactly CLIP-Scope's forward for a checkpoint of theirs, loaded
    with `torch.load(weights_only=True)` (no code runs from the file)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"CLIP-Scope checkpoint {path} does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a loadable torch checkpoint ({exc})") from exc
    try:
        state = ckpt["model_state_dict"]
        pre_b, enc, dec = state["pre_b"], state["enc"], state["dec"]
        k, n, d = int(ckpt["k"]), int(ckpt["n_features"]), int(ckpt["d_in"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{path} is not a CLIP-Scope checkpoint (needs model_state_dict with pre_b, enc, dec and k, "
            f"n_features, d_in): missing {exc}"
        ) from exc
    if tuple(enc.shape) != (d, n) or tuple(dec.shape) != (n, d) or tuple(pre_b.shape) != (d,):
        raise CheckpointError(f"{path}: shapes pre_b {tuple(pre_b.shape)}, enc {tuple(enc.shape)}, "
                              f"dec {tuple(dec.shape)} do not match d_in={d}, n_features={n}")
    sae = TopKSAE(d, n, k, relu=False, encoder_bias=False, normalize_decoder=False)
    with torch.no_grad():
        sae.W_enc.copy_(enc.float())
        sae.W_dec.copy_(dec.float())
        sae.b_dec.copy_(pre_b.float())
    sae.clipscope_meta = {key: ckpt[key] for key in ("token_count", "n_iter", "log_id") if key in ckpt}
    return sae.to(device)
