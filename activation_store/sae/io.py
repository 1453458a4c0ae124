"""Saving and loading SAEs: our checkpoints, SAELens's layout, CLIP-Scope's files, and folding the
reader's normalisation into the weights so an SAE runs on raw activations."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from activation_store.readers.normalize import Normalizer
from activation_store.sae.clipscope import CheckpointError, load_clipscope
from activation_store.sae.model import TopKSAE


def fold_normalizer(sae: TopKSAE, normalizer: Normalizer) -> TopKSAE:
    """An SAE on raw activations x equal to `inverse(sae(apply(x)))` for an SAE trained on
    normalised ones, y = (x - shift) * scale per channel."""
    shift = torch.as_tensor(normalizer.shift, dtype=torch.float32)
    scale = torch.as_tensor(normalizer.scale, dtype=torch.float32)
    c = sae.cfg
    folded = TopKSAE(c.d_in, c.n_latents, c.k, relu=c.relu, encoder_bias=c.encoder_bias, normalize_decoder=False)
    with torch.no_grad():
        folded.W_enc.copy_(scale[:, None] * sae.W_enc.detach().cpu())
        folded.b_enc.copy_(sae.b_enc.detach().cpu())
        folded.W_dec.copy_(sae.W_dec.detach().cpu() / scale[None, :])
        folded.b_dec.copy_(sae.b_dec.detach().cpu() / scale + shift)
    return folded


def save_checkpoint_weights(sae: TopKSAE, folder: str | Path, extra: dict | None = None) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}, str(folder / "sae.safetensors"))
    (folder / "config.json").write_text(json.dumps({"sae": sae.config_dict(), **(extra or {})}, indent=2))


def export_saelens(sae: TopKSAE, folder: str | Path, normalizer: Normalizer | None = None, hook_name: str = "",
                   model_name: str = "") -> Path:
    """SAELens's layout: `cfg.json` + `sae_weights.safetensors` (W_enc (d, n), W_dec (n, d), b_enc,
    b_dec), with our normalisation folded into the weights (SAELens does the same at save)."""
    if normalizer is not None and normalizer.mode != "none":
        sae = fold_normalizer(sae, normalizer)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = sae.cfg
    save_file({"W_enc": sae.W_enc.detach().contiguous().cpu(), "W_dec": sae.W_dec.detach().contiguous().cpu(),
               "b_enc": sae.b_enc.detach().contiguous().cpu(), "b_dec": sae.b_dec.detach().contiguous().cpu()},
              str(folder / "sae_weights.safetensors"))
    cfg = {"architecture": "topk", "d_in": c.d_in, "d_sae": c.n_latents, "k": c.k,
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": c.k}, "apply_b_dec_to_input": True,
           "normalize_activations": "none", "dtype": "float32", "device": "cpu", "hook_name": hook_name,
           "model_name": model_name, "relu_after_topk": c.relu, "source": "activation-store"}
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return folder


def load_sae(path: str | Path, device: str = "cpu") -> TopKSAE:
    """Load an SAE from one of our checkpoint folders, a SAELens folder, or a CLIP-Scope .pt file."""
    p = Path(path)
    if p.is_file() and p.suffix == ".pt":
        return load_clipscope(p, device)
    if (p / "sae.safetensors").exists() and (p / "config.json").exists():
        cfg = json.loads((p / "config.json").read_text())["sae"]
        sae = TopKSAE(cfg["d_in"], cfg["n_latents"], cfg["k"], relu=cfg["relu"], encoder_bias=cfg["encoder_bias"],
                      normalize_decoder=cfg["normalize_decoder"])
        sae.load_state_dict(load_file(str(p / "sae.safetensors")))
        return sae.to(device)
    if (p / "sae_weights.safetensors").exists() and (p / "cfg.json").exists():
        cfg = json.loads((p / "cfg.json").read_text())
        k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
        if k is None:
            raise CheckpointError(f"{p}/cfg.json is not a TopK SAE (no k)")
        w = load_file(str(p / "sae_weights.safetensors"))
        sae = TopKSAE(int(cfg["d_in"]), int(cfg["d_sae"]), int(k), relu=bool(cfg.get("relu_after_topk", True)),
                      normalize_decoder=False)
        sae.load_state_dict({"W_enc": w["W_enc"], "W_dec": w["W_dec"], "b_enc": w["b_enc"], "b_dec": w["b_dec"]})
        return sae.to(device)
    raise CheckpointError(
        f"{path} is neither an activation-store checkpoint (sae.safetensors + config.json), a SAELens folder "
        f"(sae_weights.safetensors + cfg.json) nor a CLIP-Scope .pt file"
    )


# where CLIP-Scope's own `TopKSAE.from_pretrained` looks when it is given no repo
CLIPSCOPE_REPO = "lewington/CLIP-ViT-L-scope"


def from_pretrained(checkpoint: str, repo_id: str | None = None, device: str = "cpu") -> TopKSAE:
    """`TopKSAE.from_pretrained`: a local path, or a file of a Hugging Face repo (downloaded with
    huggingface_hub, or found in its cache). A name that is not a local path and comes without
    `repo_id` is looked up in CLIP-Scope's repo, as CLIP-Scope's model card does:
    `TopKSAE.from_pretrained("22_resid/1200013184.pt")`."""
    if repo_id is None and Path(checkpoint).exists():
        return load_sae(checkpoint, device)
    repo_id = repo_id or CLIPSCOPE_REPO
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with open_clip
        raise CheckpointError("fetching from the hub needs huggingface_hub") from exc
    try:
        local = hf_hub_download(repo_id, checkpoint)
    except Exception as exc:
        raise CheckpointError(f"cannot fetch {checkpoint} from {repo_id}: {exc}") from exc
    return load_sae(local, device)

