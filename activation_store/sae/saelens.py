"""SAELens's SAE folders, both ways: `cfg.json` + `sae_weights.safetensors`. Reading gives an
`SAEState` of an SAE on raw activations whose forward equals SAELens's (6.x) forward for that
folder; writing takes the tensors of an SAE on raw activations and refuses one SAELens cannot
represent exactly. Nothing here imports sae_lens: its semantics are re-derived from its source.

SAELens 6.x TopK SAE, as its `TopKSAE.encode` / `decode` compute it (`A` the input normalisation,
n_i = ||W_dec[i]||):

    s   = A(x) - b_dec * apply_b_dec_to_input
    pre = s @ W_enc + b_enc              (* n  if rescale_acts_by_decoder_norm)
    z   = ReLU(TopK_k(pre))              (ReLU always: there is no option without it)
    x^  = A^-1((z / n) @ W_dec + b_dec)  (/ n only if rescale_acts_by_decoder_norm)

Every cfg entry (and file) that changes that forward, and what reading does with it:

    =====================================  ==================================================
    cfg entry / file                       reading
    =====================================  ==================================================
    architecture "topk"                    honoured; every other one refused (standard, gated,
                                           jumprelu, batchtopk, matryoshka_batchtopk, abstopk,
                                           matching_pursuit, temporal, transcoders, ...)
    k                                      honoured (6.x default 100 when absent, as SAELens;
                                           pre-6.0: activation_fn_kwargs.k)
    d_in, d_sae                            honoured (shapes checked against the weights)
    ReLU after the top-k                   honoured (always on in SAELens)
    apply_b_dec_to_input = false           folded: b_enc' = b_enc + b_dec @ W_enc
    rescale_acts_by_decoder_norm = true    folded: W_enc' = W_enc * n, b_enc' = b_enc * n,
                                           W_dec' = W_dec / n (refused if some n_i = 0: SAELens
                                           itself returns NaN for that latent)
    normalize_activations "none"           honoured
      "expected_average_only_in"           folded with activation_scaler.json's scaling_factor
                                           (a mid-training checkpoint); refused without it
      "covariance_whitening"               folded with activation_whitening.safetensors (mean,
                                           matrix, inverse_matrix); refused without it
      "constant_norm_rescale","layer_norm" refused: a per-token rescale is no affine map
    reshape_activations "hook_z"           honoured: only a reshape of (..., heads, d_head) to
                                           (..., heads*d_head); our SAE takes the flat vector
    metadata.hook_head_index (not null)    refused: the SAE reads one head's slice of its hook
    finetuning_scaling_factor + tensor     folded (SAELens <= 5 decoded (z * s) @ W_dec):
      scaling_factor                       W_dec' = s * W_dec; a tensor of ones is dropped; a
                                           non-ones one without the flag refused (as SAELens)
    dtype                                  the weights are rounded to it (as SAELens loads
                                           them), then computed in float32
    relu_after_topk = false                refused (written by activation-store before this
                                           check existed: SAELens applies a ReLU regardless)
    any other tensor in the weights        refused (SAELens's strict load refuses it too)
    sae_lens_version absent or < 6         the pre-6.0 cfg is converted as SAELens does
                                           (hook_point -> hook_name, activation_fn_str, bool
                                           normalize_activations, ...)
    =====================================  ==================================================

Entries that do not change the SAE's forward are kept in `meta["saelens"]` only: device,
model_name, hook_name, prepend_bos, context_size, seqpos_slice, dataset_path,
model_from_pretrained_kwargs, neuronpedia_id, and the training-only decoder_init_norm,
aux_loss_coefficient, use_sparse_activations (same values, sparse tensors). `use_error_term` is an
argument at SAELens's load time, not a file entry. All folding is computed in float64 from the
weights as SAELens loads them, and cast to float32 once."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from activation_store.errors import ActivationStoreError, CheckpointError
from activation_store.sae.config import SAEConfig, SAEState
from activation_store.sae.io import TENSORS

# the SAELens release whose folder layout `write_saelens` writes (and the parity tests load with)
SAELENS_VERSION = "6.54.12"
CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
SCALER, WHITENING = "activation_scaler.json", "activation_whitening.safetensors"
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}
_OTHER_ARCHITECTURES = {
    "standard": "a ReLU SAE with no top-k",
    "gated": "a gated SAE (no top-k)",
    "jumprelu": "a JumpReLU SAE (a threshold per latent, no top-k)",
    "batchtopk": "BatchTopK picks the top k*batch values over a whole batch, so a token's latents "
                 "depend on the rest of its batch",
    "matryoshka_batchtopk": "Matryoshka BatchTopK picks its top values over a whole batch",
    "abstopk": "AbsTopK ranks latents by |pre-activation| and keeps their signs",
    "matching_pursuit": "matching pursuit selects latents greedily, one residual at a time",
    "temporal": "a temporal SAE attends over the sequence",
}
# pre-6.0 cfg keys SAELens moves into `metadata` (its LLM_METADATA_KEYS)
_METADATA_KEYS = ("model_name", "hook_name", "model_class_name", "hook_head_index", "model_from_pretrained_kwargs",
                  "prepend_bos", "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice",
                  "dataset_path", "sae_lens_version", "sae_lens_training_version", "hook_name_out",
                  "hook_head_index_out", "hf_hook_name", "hf_hook_name_out")


def is_saelens(path: str | Path) -> bool:
    p = Path(path)
    return (p / WEIGHTS).is_file() and (p / CFG).is_file()


# ---------------------------------------------------------------------------- writing
def write_saelens(tensors: dict, config: SAEConfig, folder: str | Path, hook_name: str = "",
                  model_name: str = "") -> Path:
    """SAELens 6.x's layout of an SAE on raw activations (fold a normaliser in first): a `topk`
    SAE whose `SAE.load_from_disk` forward equals ours. Refuses an SAE without the ReLU after its
    top-k: SAELens's TopK always applies one and its AbsTopK ranks by magnitude, so no SAELens
    architecture computes it."""
    c = config
    if not c.relu:
        raise CheckpointError(
            "SAELens cannot represent this SAE: it keeps negative top-k values (relu=False, as CLIP-Scope's), "
            "but SAELens's TopK SAE always applies a ReLU after the top-k (and its AbsTopK ranks by magnitude); "
            "export it in CLIP-Scope's format instead (export_clipscope / write_clipscope)")
    w = _checked(tensors, c)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"architecture": "topk", "d_in": w["W_enc"].shape[0], "d_sae": c.n_latents, "k": c.k,
           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none", "rescale_acts_by_decoder_norm": False,
           "metadata": {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": None,
                        "hook_name": hook_name or None, "model_name": model_name or None, "hook_head_index": None,
                        "source": "activation-store"}}
    tmp_w, tmp_c = folder / f".{WEIGHTS}.tmp-{os.getpid()}", folder / f".{CFG}.tmp-{os.getpid()}"
    try:
        save_file(w, str(tmp_w))
        tmp_c.write_text(json.dumps(cfg, indent=2))
        os.replace(tmp_w, folder / WEIGHTS)
        os.replace(tmp_c, folder / CFG)
    finally:
        tmp_w.unlink(missing_ok=True)
        tmp_c.unlink(missing_ok=True)
    return folder


def _checked(tensors: dict, c: SAEConfig) -> dict:
    """float32, contiguous, shape-checked W_enc, W_dec, b_enc (zeros without an encoder bias), b_dec."""
    missing = [k for k in ("W_enc", "W_dec", "b_dec") if k not in tensors]
    if missing:
        raise CheckpointError(f"the SAE's tensors lack {missing}; give W_enc, W_dec, b_enc and b_dec")
    w = {k: tensors[k].detach().to("cpu", torch.float32).contiguous() for k in ("W_enc", "W_dec", "b_dec")}
    d = w["W_enc"].shape[0] if w["W_enc"].ndim == 2 else -1
    n = c.n_latents
    if c.encoder_bias:
        if "b_enc" not in tensors:
            raise CheckpointError("the SAE has an encoder bias but its tensors lack b_enc")
        w["b_enc"] = tensors["b_enc"].detach().to("cpu", torch.float32).contiguous()
    else:  # an SAE without an encoder bias ignores whatever its b_enc holds
        w["b_enc"] = torch.zeros(n)
    want = {"W_enc": (d, n), "W_dec": (n, d), "b_enc": (n,), "b_dec": (d,)}
    bad = {k: tuple(v.shape) for k, v in w.items() if tuple(v.shape) != want[k]}
    if bad or d < 1 or (c.d_in is not None and c.d_in != d):
        raise CheckpointError(f"the SAE's tensor shapes {({k: tuple(v.shape) for k, v in w.items()})} do not fit "
                              f"n_latents={n}, d_in={c.d_in if c.d_in is not None else d}")
    return {k: w[k] for k in TENSORS}


# ---------------------------------------------------------------------------- reading
def read_saelens(path: str | Path) -> SAEState:
    """An SAELens folder as an SAE on raw activations whose forward equals SAELens's; refuses (with
    CheckpointError) every folder whose forward a TopKSAE cannot express (see the module's table)."""
    p = Path(path)
    try:
        raw = json.loads((p / CFG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{p}/{CFG} cannot be read as JSON ({exc}); is this a SAELens folder?") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{p}/{CFG} is not a JSON object; is this a SAELens folder?")
    cfg = _as_v6(raw)
    meta = cfg["metadata"]
    arch = cfg.get("architecture")
    if arch != "topk":
        why = _OTHER_ARCHITECTURES.get(arch, "not a TopK SAE")
        raise CheckpointError(f"{p} holds a SAELens '{arch}' SAE ({why}); only 'topk' SAEs load as a TopKSAE")
    if raw.get("relu_after_topk") is False:
        raise CheckpointError(
            f"{p} says relu_after_topk=false (an old activation-store export of a no-ReLU SAE), but SAELens "
            f"applies a ReLU after the top-k, so the folder means two different SAEs; re-export the SAE from its "
            f"original checkpoint with export_clipscope")
    if meta.get("hook_head_index") is not None:
        raise CheckpointError(
            f"{p} is an SAE on one attention head (hook_head_index={meta['hook_head_index']}) of "
            f"{meta.get('hook_name')}; a TopKSAE reads a location's whole vector, so it cannot be loaded here")
    mode = cfg.get("normalize_activations", "none")
    if mode in ("constant_norm_rescale", "layer_norm"):
        raise CheckpointError(
            f"{p} normalises each input by its own norm or statistics (normalize_activations={mode!r}), which no "
            f"fixed weights of a TopKSAE compute; only 'none', 'expected_average_only_in' and "
            f"'covariance_whitening' (with their saved statistics) load")
    if mode not in ("none", "expected_average_only_in", "covariance_whitening"):
        raise CheckpointError(f"{p}: unknown normalize_activations={mode!r}")
    if cfg.get("reshape_activations", "none") not in ("none", "hook_z"):
        raise CheckpointError(f"{p}: unknown reshape_activations={cfg['reshape_activations']!r}")
    dtype = _DTYPES.get(str(cfg.get("dtype", "float32")).removeprefix("torch."))
    if dtype is None:
        raise CheckpointError(f"{p}: unknown dtype {cfg.get('dtype')!r} (float32, float64, float16, bfloat16)")
    missing = [key for key in ("d_in", "d_sae") if key not in cfg]
    if missing:
        raise CheckpointError(f"{p}/{CFG} lacks {missing}; is this a SAELens folder?")
    try:
        k, d, n = int(cfg.get("k", 100)), int(cfg["d_in"]), int(cfg["d_sae"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{p}/{CFG}: k, d_in and d_sae must be integers ({exc})") from exc

    try:
        w = load_file(str(p / WEIGHTS))
    except (OSError, SafetensorError, RuntimeError) as exc:
        raise CheckpointError(f"{p}/{WEIGHTS} cannot be read ({exc})") from exc
    scale = _finetuning_scale(w, cfg, p)
    missing = [name for name in TENSORS if name not in w]
    extra = sorted(set(w) - set(TENSORS))
    if missing or extra:
        raise CheckpointError(f"{p}/{WEIGHTS} is not a SAELens TopK SAE's: it lacks {missing} and has {extra}")
    want = {"W_enc": (d, n), "W_dec": (n, d), "b_enc": (n,), "b_dec": (d,)}
    bad = {k_: tuple(w[k_].shape) for k_ in TENSORS if tuple(w[k_].shape) != want[k_]}
    if bad:
        raise CheckpointError(f"{p}: tensor shapes {bad} do not fit d_in={d}, d_sae={n}")
    # the weights as SAELens holds them (rounded to cfg.dtype), then exact arithmetic
    t = {k_: w[k_].to(dtype).double() for k_ in TENSORS}
    if scale is not None:
        scale = scale.to(dtype).double()
    affine = _normalisation(p, mode, d)
    tensors = _fold(t, p, rescale=bool(cfg.get("rescale_acts_by_decoder_norm", False)), finetuning=scale,
                    b_dec_in=bool(cfg.get("apply_b_dec_to_input", True)), affine=affine)
    try:
        config = SAEConfig(n_latents=n, k=k, d_in=d, relu=True, encoder_bias=True, normalize_decoder=False)
    except ActivationStoreError as exc:
        raise CheckpointError(f"{p}: {exc}") from exc
    return SAEState(config, {k_: v.float() for k_, v in tensors.items()}, None, {"saelens": raw})


def _major(version) -> int | None:
    m = re.match(r"\s*v?(\d+)", str(version))
    return int(m.group(1)) if m else None


def _is_v6(version) -> bool:
    """SAELens's own test: version >= 6.0.0-rc.0."""
    if not version:
        return False
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:  # packaging is not one of our dependencies
        return (_major(version) or 0) >= 6
    try:
        return Version(str(version)) >= Version("6.0.0-rc.0")
    except InvalidVersion:
        return (_major(version) or 0) >= 6


def _as_v6(cfg: dict) -> dict:
    """A cfg as SAELens 6.x sees it: pre-6.0 ones (no sae_lens_version, or < 6) converted as its
    `handle_pre_6_0_config` does."""
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    if _is_v6(cfg.get("sae_lens_version") or metadata.get("sae_lens_version")):
        return {**cfg, "metadata": dict(metadata)}
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
               "activation_fn_str": "activation_fn"}
    new = {renames.get(key, key): value for key, value in cfg.items()}
    new.setdefault("apply_b_dec_to_input", True)
    new.setdefault("finetuning_scaling_factor", False)
    new.setdefault("architecture", "standard")
    new.setdefault("reshape_activations", "hook_z" if "hook_z" in (new.get("hook_name") or "") else "none")
    kwargs = new.get("activation_fn_kwargs") or {}
    if new.get("activation_fn") == "topk" and kwargs.get("k") is not None:
        new["architecture"] = "topk"
    if new["architecture"] == "topk" and kwargs.get("k") is not None:
        new["k"] = kwargs["k"]  # SAELens takes activation_fn_kwargs' k over a top-level one
    if isinstance(new.get("normalize_activations"), bool):
        new["normalize_activations"] = "expected_average_only_in" if new["normalize_activations"] else "none"
    if new.get("normalize_activations") is None:
        new["normalize_activations"] = "none"
    new["metadata"] = {**metadata, **{key: new[key] for key in _METADATA_KEYS if key in new}}
    return new


def _finetuning_scale(w: dict, cfg: dict, p: Path) -> torch.Tensor | None:
    """SAELens <= 5's per-latent finetuning scale (decode: (z * s) @ W_dec), taken out of `w`."""
    names = [name for name in ("scaling_factor", "finetuning_scaling_factor") if name in w]
    if not names:
        return None
    if len(names) > 1:
        raise CheckpointError(f"{p}/{WEIGHTS} holds both scaling_factor and finetuning_scaling_factor")
    s = w.pop(names[0])
    if torch.allclose(s.float(), torch.ones_like(s, dtype=torch.float32)):
        return None  # SAELens drops a scale of ones
    if not cfg.get("finetuning_scaling_factor"):
        raise CheckpointError(f"{p}/{WEIGHTS} holds a {names[0]} but cfg.json does not set finetuning_scaling_factor "
                              f"(SAELens refuses this folder too); set it to true if the scale is meant")
    if tuple(s.shape) != (int(cfg["d_sae"]),):
        raise CheckpointError(f"{p}: {names[0]} has shape {tuple(s.shape)}, not (d_sae,)")
    return s


def _normalisation(p: Path, mode: str, d: int):
    """(M, M^-1, mean) of the affine input map a training checkpoint was trained behind,
    s = (x - mean) @ M, as SAELens's ActivationScaler applies it (scale, then whiten); M is a
    float for a pure scale. None for mode 'none'."""
    if mode == "none":
        return None
    try:
        saved = json.loads((p / SCALER).read_text())
    except FileNotFoundError:
        saved = {}
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{p}/{SCALER} cannot be read ({exc})") from exc
    factor = saved.get("scaling_factor")
    whitening = None
    if (p / WHITENING).is_file() and saved.get("has_whitening", True):
        try:
            whitening = {key: v.double() for key, v in load_file(str(p / WHITENING)).items()}
            whitening = (whitening["matrix"], whitening["inverse_matrix"], whitening["mean"])
        except (OSError, SafetensorError, KeyError) as exc:
            raise CheckpointError(f"{p}/{WHITENING} cannot be read as mean, matrix, inverse_matrix ({exc})") from exc
        if [tuple(v.shape) for v in whitening] != [(d, d), (d, d), (d,)]:
            raise CheckpointError(f"{p}/{WHITENING}: shapes do not fit d_in={d}")
    if mode == "expected_average_only_in" and factor is None:
        raise CheckpointError(
            f"{p} was trained on activations scaled by a factor (normalize_activations='expected_average_only_in') "
            f"that the folder does not hold ({SCALER}); fold it in with SAELens "
            f"(sae.fold_activation_norm_scaling_factor(f)) and save again")
    if mode == "covariance_whitening" and whitening is None:
        raise CheckpointError(
            f"{p} was trained on whitened activations (normalize_activations='covariance_whitening') but holds no "
            f"{WHITENING}; fold the whitening in with SAELens (sae.fold_activation_whitening) and save again")
    if whitening is None:
        return float(factor), 1.0 / float(factor), None
    M, Minv, mean = whitening
    if factor is not None:  # (x * f - mean) @ M = (x - mean / f) @ (f M)
        f = float(factor)
        M, Minv, mean = M * f, Minv / f, mean / f
    return M, Minv, mean


def _fold(t: dict, p: Path, *, rescale: bool, finetuning, b_dec_in: bool, affine) -> dict:
    """float64 weights of SAELens's forward, as our (x - b_dec) @ W_enc + b_enc form on raw x."""
    W_enc, W_dec, b_enc, b_dec = t["W_enc"], t["W_dec"], t["b_enc"], t["b_dec"]
    if rescale:  # pre * n, then (z / n) @ W_dec
        norms = W_dec.norm(dim=-1)
        if (norms == 0).any():
            raise CheckpointError(f"{p} rescales by decoder norms but {int((norms == 0).sum())} decoder rows are "
                                  f"zero (SAELens's own forward gives NaN for them); it cannot be loaded")
        W_enc, b_enc, W_dec = W_enc * norms[None, :], b_enc * norms, W_dec / norms[:, None]
    if finetuning is not None:  # (z * s) @ W_dec
        W_dec = W_dec * finetuning[:, None]
    if not b_dec_in:  # s @ W_enc + b_enc = (s - b_dec) @ W_enc + (b_enc + b_dec @ W_enc)
        b_enc = b_enc + b_dec @ W_enc
    if affine is not None:  # s = (x - m) @ M; x^ = (z @ W_dec + b_dec) @ M^-1 + m
        M, Minv, mean = affine
        if isinstance(M, float):  # a pure scale, cheap: b_dec / f and f W_enc cancel in the bias
            W_enc, W_dec, b_dec = W_enc * M, W_dec * Minv, b_dec * Minv
        else:
            c = b_dec @ Minv + mean
            W_enc2 = M @ W_enc
            b_enc = b_enc + c @ W_enc2 - (mean @ M + b_dec) @ W_enc
            W_enc, W_dec, b_dec = W_enc2, W_dec @ Minv, c
    return {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
