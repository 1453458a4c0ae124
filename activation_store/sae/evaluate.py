"""`actstore eval SAE STORE`: metrics on held-out images (split by image), on the tokens the SAE was
trained on, a token-wise MSE heatmap, training curves, top-9 activating images per latent as 3x3
grids, and one HTML report (sae/report.py). Every number comes from the reducers of sae/metrics.py."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from activation_store.configs import check_choice, option
from activation_store.devices import torch_device
from activation_store.errors import CheckpointError, ConfigError, NoDataError
from activation_store.readers import OrderedReader
from activation_store.readers.config import NORMALIZE_MODES, parse_tokens
from activation_store.readers.normalize import Normalizer
from activation_store.readers.selection import TokenSelection
from activation_store.sae import checkpoint, io, metrics, report
from activation_store.sae.model import TopKSAE, read_state
from activation_store.sae.sort_eval import write_sort_eval
from activation_store.store import open_store


@dataclass
class EvalConfig:
    sae: str | None = option(None, positional=True, help="run folder (its newest checkpoint), checkpoint folder "
                             "(RUN/checkpoints/<tokens>), CLIP-Scope .pt file, SAELens folder, or a file of a "
                             "Hugging Face repo (a relative name that is no local path, e.g. 22_resid/1200013184.pt, "
                             "is looked up in CLIP-Scope's repo; see --repo-id)")
    repo_id: str | None = option(None, help="Hugging Face repo holding SAE (default: CLIP-Scope's, "
                                 "lewington/CLIP-ViT-L-scope, for names that are not local paths)")
    store: str | None = option(None, positional=True, help="store (default: the one the SAE was trained on)")
    location: str | None = option(None, help="e.g. resid_22 (default: the one the SAE was trained on)")
    tokens: object = option(None, help="all, cls, patches or indices 0,5,9 (default: those the SAE was trained "
                            "on; all for other SAEs)", parse=parse_tokens)
    normalize: str | None = option(None, choices=NORMALIZE_MODES, help="default: the training run's normaliser; "
                                   "standardize for a CLIP-Scope file (their per-batch standardisation, with the "
                                   "store's statistics); none for a SAELens folder (folded in)")
    out: str = option("eval", help="output folder")
    max_tokens: int = option(2_000_000, help="evaluate on at most this many tokens")
    batch_size: int = option(4096, help="tokens per batch")
    patch_position: int = option(137, help="CLIP-Scope's patch position for top images")
    top_n: int = option(9, help="images per grid")
    grid_latents: int = option(12, help="latents shown as image grids (the first that fire on >= top_n images)")
    first_latents: int = option(2048, help="CLIP-Scope's active feature proportion looks at these latents")
    min_images: int = option(10, help="a latent is active when it fires on this many images' CLS tokens")
    query_candidates: int = option(3, help="images ranked after the top-n, kept as sort-eval query images")
    sort_eval_pairs: int = option(0, help="feature pairs of sort-eval material to write (0: none)")
    seed: int = option(0, help="seed of the sort-eval pairs")
    device: str = option("cpu", help="cpu, cuda, cuda:1 ...")
    storage_options: dict | None = option(None, help="fsspec options of a remote store", cli=False)

    def __post_init__(self) -> None:
        if self.normalize is not None:
            check_choice("normalize", self.normalize, NORMALIZE_MODES)
        for name in ("max_tokens", "batch_size", "top_n"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    def check_complete(self) -> None:
        if self.sae is None:
            raise ConfigError("eval needs an SAE: a run folder, a checkpoint, a CLIP-Scope .pt file or a SAELens folder")


@dataclass
class Subject:
    """What is evaluated, on what: resolved from a checkpoint of ours or given for other SAEs."""

    sae: TopKSAE  # in the space of `normalizer`
    store: object
    location: str
    tokens: object
    normalizer: Normalizer
    holdout: float
    checkpoint: Path | None = None
    dead: float | None = None  # the trainer's dead proportion at the checkpoint


def resolve_subject(cfg: EvalConfig) -> Subject:
    """Our runs record store, location, tokens, normaliser and holdout; other SAEs need them given."""
    ckpt = checkpoint.resolve(cfg.sae) if cfg.repo_id is None else None
    if ckpt is not None:
        state = checkpoint.read_sae_state(ckpt)
        store = open_store(cfg.store or state.meta["store"], cfg.storage_options)
        location = cfg.location or state.meta["location"]
        tokens = cfg.tokens if cfg.tokens is not None else state.meta["tokens"]
        norm = state.normalizer if cfg.normalize is None else _store_normalizer(cfg.normalize, store, location, tokens)
        return Subject(TopKSAE.from_state(state, cfg.device, normalized=True), store, location, tokens, norm,
                       state.meta["holdout"], ckpt, state.meta["dead_proportion"])
    local = local_sae_path(cfg.sae, cfg.repo_id)
    try:
        state = read_state(local)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; `actstore eval` also takes a run folder written by `actstore train`") from exc
    if not (cfg.store and cfg.location):
        raise ConfigError(f"{cfg.sae} is not one of our training runs, so it records no store or location: "
                          f"give both (actstore eval SAE STORE --location resid_22)")
    store = open_store(cfg.store, cfg.storage_options)
    tokens = cfg.tokens if cfg.tokens is not None else "all"
    clipscope = "clipscope" in state.meta
    norm = _store_normalizer(cfg.normalize or ("standardize" if clipscope else "none"), store, cfg.location, tokens)
    return Subject(TopKSAE.from_state(state, cfg.device), store, cfg.location, tokens, norm, 0.0)


def local_sae_path(name: str, repo_id: str | None = None) -> str:
    """What `TopKSAE.from_pretrained` would read: `name` itself when it is a local path (and no
    repo is given), else its copy from the Hugging Face hub (`repo_id`, default CLIP-Scope's repo).
    A missing absolute or ./-relative path is never looked up on the hub: it is reported as missing."""
    if repo_id is None and (Path(name).exists() or Path(name).is_absolute()
                            or str(name).startswith(("./", "../", "~"))):
        return name
    try:
        return io.hub_file(name, repo_id)
    except CheckpointError as exc:
        raise CheckpointError(f"{name} is no local path, and {exc}") from exc


def _store_normalizer(mode: str, store, location: str, tokens) -> Normalizer:
    group = TokenSelection.resolve(tokens, store.n_tokens).stats_group
    return Normalizer.from_store(mode, store, store.check_location(location), group)


class TopImages:
    """Running top-n (value, image row) per latent, for one token position."""

    def __init__(self, n_latents: int, n: int) -> None:
        self.values = torch.full((n, n_latents), -math.inf)
        self.rows = torch.full((n, n_latents), -1, dtype=torch.int64)

    def add(self, values: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor) -> None:
        """Top-k codes (B, k) of B tokens of this position, each of the image `rows[i]`."""
        if values.shape[0] == 0:
            return
        latent = torch.zeros(values.shape[0], self.values.shape[1]).scatter_(1, indices.cpu(), values.float().cpu())
        vals = torch.cat([self.values, latent])
        rws = torch.cat([self.rows, rows.cpu()[:, None].expand(-1, latent.shape[1])])
        top = vals.topk(self.values.shape[0], dim=0)
        self.values, self.rows = top.values, rws.gather(0, top.indices)


def evaluate(cfg: EvalConfig) -> dict:
    cfg.check_complete()
    torch_device(cfg.device)
    sub = resolve_subject(cfg)
    sae, store = sub.sae.eval(), sub.store
    if sae.cfg.d_in != store.d_model:
        raise ConfigError(f"the SAE reads {sae.cfg.d_in}-dimensional inputs but {store.url} stores d_model "
                          f"{store.d_model}")
    split = "eval" if sub.holdout else "all"
    reader = OrderedReader(store, sub.location, tokens=sub.tokens, batch_size=cfg.batch_size, split=split,
                           holdout=sub.holdout, device=cfg.device)
    n = sae.cfg.n_latents
    recon, l0, firing = metrics.Reconstruction(), metrics.L0(), metrics.Firing(n)
    tokenwise = metrics.TokenwiseMSE(store.n_tokens)
    top_cls, top_patch = TopImages(n, cfg.top_n + cfg.query_candidates), TopImages(n, cfg.top_n)
    progress = tqdm(total=cfg.max_tokens, unit="tok", unit_scale=True, desc="eval")
    with torch.no_grad():
        for x_raw, ids in reader:
            x = sub.normalizer.apply(x_raw.float())
            values, indices, _ = sae.encode_topk(x)
            x_hat = sae.decode_sparse(values, indices)
            pos = ids[:, 1].to(torch.int64)
            tokenwise.add(recon.add(x, x_hat), pos)
            l0.add(values)
            cls, patch = pos == 0, pos == cfg.patch_position
            firing.add(values, indices, cls.to(values.device))
            top_cls.add(values[cls], indices[cls], ids[cls, 0])
            top_patch.add(values[patch], indices[patch], ids[patch, 0])
            progress.update(x.shape[0])
            if recon.tokens >= cfg.max_tokens:
                break
    progress.close()
    reader.close()
    if recon.tokens == 0:
        raise NoDataError(f"no held-out images in {store.url} for {sub.location} (holdout {sub.holdout}); "
                          f"train with a larger holdout or evaluate on another store")
    eval_images = int(tokenwise.count.max())
    result = {
        "sae": str(sub.checkpoint or cfg.sae), "store": store.url, "location": sub.location,
        "tokens": sub.tokens, "split": split, "holdout": sub.holdout,
        "eval_tokens": recon.tokens, "eval_images": eval_images,
        "normalization": sub.normalizer.mode,
        **recon.result(),
        "l0": l0.value,
        "dead_proportion": sub.dead,  # CLIP-Scope's: the trainer's counters at this checkpoint
        "never_fired_proportion": firing.never_fired_proportion,
        "active_feature_proportion_cls": firing.active_feature_proportion(cfg.first_latents, cfg.min_images),
        "tokenwise_mse": tokenwise.value.tolist(),
        "definitions": "docs/metrics.md; computed on the normalised activations the SAE was trained on",
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"tokenwise": report.tokenwise_png(result["tokenwise_mse"], out / "tokenwise_mse.png")}
    curves = checkpoint.log_of(sub.checkpoint) if sub.checkpoint is not None else None
    curves_file = report.curves_png(curves, out / "training_curves.png") if curves and curves.exists() else None
    if curves_file:
        figures["curves"] = curves_file
    images = report.ImageFetcher(store, cfg.storage_options)
    result["grids"] = _grids(cfg, firing, top_cls, top_patch, images, out, eval_images)
    if cfg.sort_eval_pairs:
        result["sort_eval"] = write_sort_eval(top_cls, firing.cls_images, cfg, images, out / "sort_eval")
    result["missing_tiles"] = dict(images.missing)  # grey tiles, by reason
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    report.write_html(result, figures, out)
    return result


def _grids(cfg: EvalConfig, firing, top_cls: TopImages, top_patch: TopImages, images, out: Path,
           eval_images: int) -> list[dict]:
    shown = [int(i) for i in torch.nonzero(firing.cls_images >= min(cfg.top_n, eval_images)).flatten()[:cfg.grid_latents]]
    grids = []
    for latent_id in shown:
        for name, top in (("cls", top_cls), (f"patch{cfg.patch_position}", top_patch)):
            rows = [int(r) for r, v in zip(top.rows[:cfg.top_n, latent_id], top.values[:cfg.top_n, latent_id])
                    if r >= 0 and v > 0]
            if rows:
                path = out / "grids" / f"latent{latent_id:05d}_{name}.png"
                report.grid_png([images.get(r) for r in rows], path)
                grids.append({"latent": latent_id, "token": name, "file": str(path.relative_to(out)),
                              "values": [round(float(v), 4) for v in top.values[:len(rows), latent_id]]})
    return grids
