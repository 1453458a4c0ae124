"""`actstore export RUN --format saelens|clipscope --out PATH`: a trained SAE in another project's
file format, on raw store activations (the run's normaliser folded into the weights, exactly),
with what the run knows filled in: SAELens's `hook_name` from the location it trained on
(`resid_22` -> `blocks.22.hook_resid_post`, the residual stream after 0-indexed block 22) and
`model_name` from the model the store's harvest recorded; CLIP-Scope's `token_count` (tokens
trained), `n_iter` (steps) and `dead_latents` (the trainer's per-latent counters: tokens since each
latent last fired) from the checkpoint.

The writers (`model.export_saelens`, `model.export_clipscope`) refuse, with CheckpointError, an SAE
the format cannot represent exactly: SAELens has no TopK without a ReLU (`--arch clipscope`, or
`--no-relu`), CLIP-Scope no encoder bias and no ReLU (`--arch openai`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from activation_store.configs import check_choice, option
from activation_store.errors import ActivationStoreError, ConfigError
from activation_store.sae import checkpoint, model
from activation_store.store.locations import HookLocation

FORMATS = ("saelens", "clipscope")


@dataclass
class ExportConfig:
    sae: str | None = option(None, positional=True, help="run folder (its newest checkpoint) or checkpoint folder "
                             "(RUN/checkpoints/<tokens>); any other SAE load_sae reads converts too")
    format: str | None = option(None, choices=FORMATS, help="saelens: a folder of cfg.json + "
                                "sae_weights.safetensors; clipscope: a .pt file of CLIP-Scope's layout")
    out: str | None = option(None, help="where to write: a folder (saelens) or a .pt file (clipscope; an "
                             "existing folder gets <tokens trained>.pt, their naming)")
    hook_name: str | None = option(None, help="SAELens hook name (default: from the run's location, resid_22 -> "
                                   "blocks.22.hook_resid_post)")
    model_name: str | None = option(None, help="SAELens model name (default: the model the store recorded, "
                                    "NAME/PRETRAINED, e.g. ViT-L-14/laion2b_s32b_b82k)")
    storage_options: dict | None = option(None, help="fsspec options of a remote store (its model record)",
                                          cli=False)

    def __post_init__(self) -> None:
        if self.format is not None:
            check_choice("format", self.format, FORMATS)

    def check_complete(self) -> None:
        missing = [f"--{name}" if name != "sae" else "an SAE (RUN or checkpoint folder)"
                   for name in ("sae", "format", "out") if getattr(self, name) is None]
        if missing:
            raise ConfigError(f"export needs {', '.join(missing)}")


def hook_name_of(location: str | None) -> str:
    """SAELens's (TransformerLens's) name of a store location: resid_L -> blocks.L.hook_resid_post."""
    if not location:
        return ""
    loc = HookLocation.parse(location)
    return f"blocks.{loc.layer}.hook_{loc.kind}_post"


def model_name_of(record: dict | None) -> str:
    """NAME/PRETRAINED of the store's model record (NAME alone for random or hub-named weights)."""
    record = record or {}
    name, pretrained = record.get("name") or "", record.get("pretrained")
    if not name or pretrained in (None, "", "none") or name.startswith(("hf-hub:", "local-dir:")):
        return name
    return f"{name}/{pretrained}"


def run_metadata(path: str, storage_options: dict | None = None) -> dict:
    """What a run of ours records about an SAE: location, store, model record, steps, tokens and
    dead-latent counters. Empty for SAEs that are not ours (their own file's metadata is used)."""
    ckpt = checkpoint.resolve(path)
    if ckpt is None:
        return {}
    cfg = checkpoint.read_config(ckpt)
    state = checkpoint.read_training_state(ckpt)
    meta = {"checkpoint": str(ckpt), "location": cfg.get("location"), "store": cfg.get("store"),
            "step": int(state["step"]), "tokens": int(state["tokens"]),
            "dead_latents": (state.get("dead") or {}).get("since"), "model": None, "notes": []}
    if meta["store"]:
        from activation_store.store import open_store

        try:
            meta["model"] = open_store(meta["store"], storage_options).attrs.get("model") or {}
        except (ActivationStoreError, OSError) as exc:
            meta["notes"].append(f"the run's store {meta['store']} could not be opened for its model record "
                                 f"({' '.join(str(exc).split())}); give --model-name")
    return meta


def export(cfg: ExportConfig) -> dict:
    """Write the SAE of `cfg.sae` in `cfg.format` at `cfg.out`; returns where and with what names."""
    cfg.check_complete()
    sae = model.load_sae(cfg.sae)  # on raw activations: the run's normaliser folded in
    run = run_metadata(cfg.sae, cfg.storage_options)
    own = sae.meta.get("saelens") or {}
    result = {"format": cfg.format, "sae": run.get("checkpoint", str(cfg.sae)), "notes": list(run.get("notes", []))}
    if cfg.format == "saelens":
        hook = cfg.hook_name if cfg.hook_name is not None else (hook_name_of(run.get("location"))
                                                                 or own.get("hook_name", ""))
        name = cfg.model_name if cfg.model_name is not None else (model_name_of(run.get("model"))
                                                                  or own.get("model_name", ""))
        path = model.export_saelens(sae, cfg.out, normalizer=None, hook_name=hook, model_name=name)
        result.update(path=str(path), hook_name=hook, model_name=name)
        return result
    if run:
        meta = {"token_count": run["tokens"], "n_iter": run["step"]}
        if run["dead_latents"] is not None:
            meta["dead_latents"] = run["dead_latents"]
    else:  # a CLIP-Scope file of theirs (or another SAE): keep what it said
        meta = dict(sae.clipscope_meta)
    out = Path(cfg.out)
    if out.is_dir():
        out = out / f"{meta.get('token_count', 0)}.pt"
    path = model.export_clipscope(sae, out, normalizer=None, meta=meta)
    result.update(path=str(path or out), meta={k: v for k, v in meta.items() if k != "dead_latents"})
    return result
