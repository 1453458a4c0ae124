"""CLIP-Scope's SAE files, both ways, names on the Hugging Face hub, and folding a normaliser into
an SAE's tensors. Everything here turns files into an `SAEState` or an SAE's tensors into files;
`TopKSAE` (model.py) turns an SAEState into a module. SAELens folders: saelens.py.

CLIP-Scope files `{L}_resid/{tokens}.pt` hold `model_state_dict` {pre_b (d), enc (d, n), dec (n, d)}
and `k`, `n_features`, `d_in` (plus their trainer's `token_count`, `dead_latents`, `n_iter`,
`log_id`); their SAE has no encoder bias and no ReLU after the top-k:

    latent = scatter(TopK_k((x - pre_b) @ enc))     (negative top-k values kept)
    x^     = latent @ dec + pre_b"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from activation_store.errors import CheckpointError
from activation_store.sae.config import SAEConfig, SAEState

# where CLIP-Scope's own `TopKSAE.from_pretrained` looks when it is given no repo
CLIPSCOPE_REPO = "lewington/CLIP-ViT-L-scope"
TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec")
# what CLIP-Scope's checkpoints hold besides the weights and k, n_features, d_in
CLIPSCOPE_META = ("token_count", "dead_latents", "n_iter", "log_id")


def fold_tensors(tensors: dict, normalizer) -> dict:
    """Weights on raw activations x equal to `inverse(sae(apply(x)))` for weights trained on
    y = (x - shift) * scale (per channel), exactly: the pre-bias becomes b_dec / scale + shift for
    both the encoder's input and the decoder's output. Computed in float64."""
    if normalizer is None or normalizer.mode == "none":
        return dict(tensors)
    shift = torch.as_tensor(normalizer.shift, dtype=torch.float64)
    scale = torch.as_tensor(normalizer.scale, dtype=torch.float64)
    t = {k: v.detach().cpu().double() for k, v in tensors.items()}
    dtype = tensors["W_enc"].dtype
    folded = {"W_enc": scale[:, None] * t["W_enc"], "b_enc": t["b_enc"], "W_dec": t["W_dec"] / scale[None, :],
              "b_dec": t["b_dec"] / scale + shift}
    return {k: v.to(dtype) for k, v in folded.items()}


# ---------------------------------------------------------------------------- CLIP-Scope
def read_clipscope(path: str | Path) -> SAEState:
    """A CLIP-Scope checkpoint, loaded with `torch.load(weights_only=True)` (no code runs from it)."""
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
    config = SAEConfig(n_latents=n, k=k, d_in=d, arch="clipscope")
    tensors = {"W_enc": enc.float(), "W_dec": dec.float(), "b_enc": torch.zeros(n), "b_dec": pre_b.float()}
    meta = {"clipscope": {key: ckpt[key] for key in CLIPSCOPE_META if key in ckpt}}
    return SAEState(config, tensors, None, meta)


def write_clipscope(tensors: dict, config: SAEConfig, path, meta: dict | None = None) -> Path:
    """CLIP-Scope's checkpoint layout of an SAE on raw activations (`tensors` in our naming; fold a
    normaliser in first), loadable with `torch.load(weights_only=True)` and by their
    `TopKSAE(k, n_features, d_in).load_state_dict(ckpt["model_state_dict"])`: `model_state_dict`
    {pre_b, enc, dec} in float32, `k`, `n_features`, `d_in`, and `token_count`, `dead_latents`
    (per-latent counters), `n_iter`, `log_id` from `meta` (flat, or under "clipscope" as
    `read_clipscope` gives them; defaults 0, zeros, 0, "activation-store"). Written atomically.

    Refuses an SAE their forward does not compute: a ReLU after the top-k (theirs keeps negative
    values, so the latents differ whenever fewer than k pre-activations are positive), or a
    nonzero encoder bias (their layout has none, and no pre_b absorbs it: pre_b is also the
    decoder's bias). The decoder's norm is not part of the forward and does not matter."""
    c = config
    if c.relu:
        raise CheckpointError(
            "CLIP-Scope's layout cannot hold this SAE: it applies a ReLU after the top-k (relu=True), but "
            "CLIP-Scope's TopK keeps negative values, so their forward would differ; export it to SAELens "
            "instead (export_saelens), or train with --no-relu for CLIP-Scope's architecture")
    missing = [k for k in ("W_enc", "W_dec", "b_dec") if k not in tensors]
    if missing:
        raise CheckpointError(f"the SAE's tensors lack {missing}; give W_enc, W_dec, b_enc and b_dec")
    enc, dec, pre_b = (tensors[k].detach().to("cpu", torch.float32).contiguous().clone()
                       for k in ("W_enc", "W_dec", "b_dec"))
    n = c.n_latents
    d = enc.shape[0] if enc.ndim == 2 else -1
    if (tuple(enc.shape) != (d, n) or tuple(dec.shape) != (n, d) or tuple(pre_b.shape) != (d,) or d < 1
            or (c.d_in is not None and c.d_in != d)):
        raise CheckpointError(f"the SAE's tensors W_enc {tuple(enc.shape)}, W_dec {tuple(dec.shape)}, b_dec "
                              f"{tuple(pre_b.shape)} do not fit n_latents={n}, d_in={c.d_in}")
    if c.encoder_bias and "b_enc" in tensors:
        b_enc = tensors["b_enc"].detach().float()
        if tuple(b_enc.shape) != (n,):
            raise CheckpointError(f"the SAE's b_enc has shape {tuple(b_enc.shape)}, not ({n},)")
        if bool((b_enc != 0).any()):
            raise CheckpointError(
                f"CLIP-Scope's layout has no encoder bias, but this SAE's b_enc is nonzero (max |b_enc| = "
                f"{float(b_enc.abs().max()):.3g}), so their forward would differ; export it to SAELens instead "
                f"(export_saelens), or train with --no-encoder-bias for CLIP-Scope's architecture")
    m = dict(meta or {})
    m = {**(m.get("clipscope") if isinstance(m.get("clipscope"), dict) else {}),
         **{k: m[k] for k in CLIPSCOPE_META if k in m}}
    dead = m.get("dead_latents")
    dead = torch.zeros(n) if dead is None else torch.as_tensor(dead).detach().cpu().clone()
    if tuple(dead.shape) != (n,):
        raise CheckpointError(f"dead_latents has shape {tuple(dead.shape)}; it must hold one counter per latent ({n},)")
    ckpt = {"model_state_dict": {"pre_b": pre_b, "enc": enc, "dec": dec}, "k": int(c.k), "n_features": int(n),
            "d_in": int(d), "token_count": int(m.get("token_count") or 0), "dead_latents": dead,
            "n_iter": int(m.get("n_iter") or 0), "log_id": str(m.get("log_id") or "activation-store")}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise CheckpointError(f"cannot write {path} ({exc})") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------- the hub
def hub_file(name: str, repo_id: str | None = None) -> str:
    """A local copy of a file of a Hugging Face repo (downloaded with huggingface_hub, or found in
    its cache); without `repo_id`, CLIP-Scope's repo, as their model card's
    `TopKSAE.from_pretrained("22_resid/1200013184.pt")` does."""
    from huggingface_hub import hf_hub_download  # imported here: only hub names need it

    repo_id = repo_id or CLIPSCOPE_REPO
    try:
        return hf_hub_download(repo_id, name)
    except Exception as exc:
        raise CheckpointError(f"cannot fetch {name} from {repo_id}: {exc}") from exc
