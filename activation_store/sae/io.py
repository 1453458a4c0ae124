"""Other tools' SAE files, both ways: SAELens folders (read and write), CLIP-Scope `.pt` files
(read), and names on the Hugging Face hub. Everything here turns files into an `SAEState` or an
SAE's tensors into files; `TopKSAE` (model.py) turns an SAEState into a module.

CLIP-Scope files `{L}_resid/{tokens}.pt` hold `model_state_dict` {pre_b (d), enc (d, n), dec (n, d)}
and `k`, `n_features`, `d_in`; their SAE has no encoder bias and no ReLU after the top-k."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from activation_store.errors import CheckpointError
from activation_store.sae.config import SAEConfig, SAEState

# where CLIP-Scope's own `TopKSAE.from_pretrained` looks when it is given no repo
CLIPSCOPE_REPO = "lewington/CLIP-ViT-L-scope"
TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec")


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


# ---------------------------------------------------------------------------- SAELens
def is_saelens(path: str | Path) -> bool:
    p = Path(path)
    return (p / "sae_weights.safetensors").is_file() and (p / "cfg.json").is_file()


def write_saelens(tensors: dict, config: SAEConfig, folder: str | Path, hook_name: str = "",
                  model_name: str = "") -> Path:
    """SAELens's layout: `cfg.json` + `sae_weights.safetensors` (W_enc (d, n), W_dec (n, d), b_enc,
    b_dec) of an SAE on raw activations (fold a normaliser in first)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: tensors[k].detach().contiguous().cpu() for k in TENSORS}, str(folder / "sae_weights.safetensors"))
    c = config
    cfg = {"architecture": "topk", "d_in": c.d_in, "d_sae": c.n_latents, "k": c.k,
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": c.k}, "apply_b_dec_to_input": True,
           "normalize_activations": "none", "dtype": "float32", "device": "cpu", "hook_name": hook_name,
           "model_name": model_name, "relu_after_topk": c.relu, "source": "activation-store"}
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return folder


def read_saelens(path: str | Path) -> SAEState:
    p = Path(path)
    try:
        cfg = json.loads((p / "cfg.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{p}/cfg.json is not valid JSON ({exc})") from exc
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if k is None:
        raise CheckpointError(f"{p}/cfg.json is not a TopK SAE (no k)")
    missing = [key for key in ("d_in", "d_sae") if key not in cfg]
    if missing:
        raise CheckpointError(f"{p}/cfg.json lacks {missing}")
    try:
        w = load_file(str(p / "sae_weights.safetensors"))
    except Exception as exc:
        raise CheckpointError(f"{p}/sae_weights.safetensors cannot be read ({exc})") from exc
    missing = [name for name in TENSORS if name not in w]
    if missing:
        raise CheckpointError(f"{p}/sae_weights.safetensors lacks {missing}")
    config = SAEConfig(n_latents=int(cfg["d_sae"]), k=int(k), d_in=int(cfg["d_in"]),
                       relu=bool(cfg.get("relu_after_topk", True)), normalize_decoder=False)
    return SAEState(config, {name: w[name] for name in TENSORS}, None, {"saelens": cfg})


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
    config = SAEConfig(n_latents=n, k=k, d_in=d, relu=False, encoder_bias=False, normalize_decoder=False)
    tensors = {"W_enc": enc.float(), "W_dec": dec.float(), "b_enc": torch.zeros(n), "b_dec": pre_b.float()}
    meta = {"clipscope": {key: ckpt[key] for key in ("token_count", "n_iter", "log_id") if key in ckpt}}
    return SAEState(config, tensors, None, meta)


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
