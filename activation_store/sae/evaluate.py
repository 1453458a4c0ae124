"""`actstore eval SAE STORE`: metrics on held-out images (split by image), a token-wise MSE heatmap,
training curves, top-9 activating images per latent as 3x3 grids, and one HTML report."""

from __future__ import annotations

import html
import io
import json
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from activation_store.errors import ConfigError
from activation_store.readers import OrderedReader
from activation_store.readers.normalize import Normalizer
from activation_store.sae.clipscope import CheckpointError
from activation_store.sae.io import load_sae
from activation_store.sae.trainer import run_checkpoints
from activation_store.store import open_store


@dataclass
class EvalConfig:
    # a checkpoint or run folder written by the trainer, or another SAE: a CLIP-Scope .pt file or a
    # SAELens folder (those need `store` and `location`)
    sae: str
    store: str | None = None  # default: the store it was trained on
    location: str | None = None  # default: the location it was trained on
    # default: the trainer's normaliser; for a CLIP-Scope file "standardize" (their per-batch
    # standardisation, with the store's statistics), for a SAELens folder "none" (folded in)
    normalize: str | None = None
    out: str = "eval"
    max_tokens: int = 2_000_000
    batch_size: int = 4096
    patch_position: int = 137  # CLIP-Scope's patch position for top images
    top_n: int = 9
    grid_latents: int = 12  # latents shown as image grids (the first that fire on >= top_n images)
    first_latents: int = 2048  # CLIP-Scope's "active feature proportion" looks at these
    min_images: int = 10
    query_candidates: int = 3  # images ranked after the top-n, kept as sort-eval query images
    sort_eval_pairs: int = 0  # feature pairs of sort-eval material to write (0: none)
    seed: int = 0
    device: str = "cpu"
    storage_options: dict | None = None


class _TopImages:
    """Running top-n (value, image row) per latent, for one token position."""

    def __init__(self, n_latents: int, n: int) -> None:
        self.values = torch.full((n, n_latents), -math.inf)
        self.rows = torch.full((n, n_latents), -1, dtype=torch.int64)

    def add(self, latent: torch.Tensor, rows: torch.Tensor) -> None:
        if latent.shape[0] == 0:
            return
        vals = torch.cat([self.values, latent.float().cpu()])
        rws = torch.cat([self.rows, rows.cpu()[:, None].expand(-1, latent.shape[1])])
        top = vals.topk(self.values.shape[0], dim=0)
        self.values, self.rows = top.values, rws.gather(0, top.indices)


def _our_checkpoint(path: str) -> Path | None:
    """A checkpoint folder of ours, or a run folder's newest checkpoint; None for anything else."""
    ckpt = Path(path)
    if (ckpt / "config.json").exists() and (ckpt / "trainer.pt").exists():
        return ckpt
    found = run_checkpoints(ckpt)
    return found[-1] if found else None


def _setup(cfg: EvalConfig):
    """(SAE, store, location, normaliser, holdout, checkpoint folder or None, the trainer's dead
    proportion or None) for our runs, whose
    checkpoints record store, location, normaliser and holdout, and for other SAEs, which need
    them given."""
    ckpt = _our_checkpoint(cfg.sae)
    if ckpt is not None:
        tcfg = json.loads((ckpt / "config.json").read_text())["trainer"]
        store = open_store(cfg.store or tcfg["store"], cfg.storage_options)
        location = cfg.location or tcfg["location"]
        state = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
        norm = (Normalizer.from_state_dict(state["normalizer"]) if cfg.normalize is None
                else Normalizer.from_store(cfg.normalize, store, location))
        since, window = state["dead"]["since"], state["dead"]["window"]
        dead = float((since >= window).float().mean())
        return load_sae(ckpt, cfg.device), store, location, norm, tcfg.get("holdout") or 0.0, ckpt, dead
    try:
        sae = load_sae(cfg.sae, cfg.device)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; `actstore eval` also takes a run folder written by `actstore train`") from exc
    if not (cfg.store and cfg.location):
        raise ConfigError(f"{cfg.sae} is not one of our training runs, so it records no store or location: "
                          f"give both (actstore eval SAE STORE --location resid_22)")
    store = open_store(cfg.store, cfg.storage_options)
    clipscope = Path(cfg.sae).suffix == ".pt"
    norm = Normalizer.from_store(cfg.normalize or ("standardize" if clipscope else "none"), store, cfg.location)
    return sae, store, cfg.location, norm, 0.0, None, None


def evaluate(cfg: EvalConfig) -> dict:
    sae, store, location, norm, holdout, ckpt, dead = _setup(cfg)
    sae.eval()
    if sae.cfg.d_in != store.d_model:
        raise ConfigError(f"the SAE reads {sae.cfg.d_in}-dimensional inputs but {store.url} stores d_model "
                          f"{store.d_model}")
    split = "eval" if holdout else "all"
    reader = OrderedReader(store, location, tokens="all", batch_size=cfg.batch_size, split=split,
                           holdout=holdout or 0.05, device=cfg.device)
    n, d, t = sae.cfg.n_latents, sae.cfg.d_in, store.n_tokens
    sums = {"sq_err": 0.0, "ev": 0.0, "l0": 0.0, "x": torch.zeros(d, dtype=torch.float64),
            "x_sq": 0.0, "tokens": 0}
    tok_err = torch.zeros(t, dtype=torch.float64)
    tok_count = torch.zeros(t, dtype=torch.float64)
    fired = torch.zeros(n, dtype=torch.bool)
    cls_images = torch.zeros(n, dtype=torch.int64)
    top_cls, top_patch = _TopImages(n, cfg.top_n + cfg.query_candidates), _TopImages(n, cfg.top_n)
    progress = tqdm(total=cfg.max_tokens, unit="tok", unit_scale=True, desc="eval")
    with torch.no_grad():
        for x_raw, ids in reader:
            x = norm.apply(x_raw.float())
            out = sae.forward_verbose(x)
            x_hat, latent = out["reconstruction"], out["latent"]
            err = (x - x_hat).pow(2).sum(-1)
            sums["sq_err"] += float(err.sum())
            var = (x - x.mean(-1, keepdim=True)).pow(2).sum(-1)
            sums["ev"] += float((1 - err / var).sum())
            sums["l0"] += float((latent > 0).sum())
            sums["x"] += x.double().sum(0).cpu()
            sums["x_sq"] += float(x.double().pow(2).sum())
            sums["tokens"] += x.shape[0]
            pos = ids[:, 1].to(torch.int64)
            tok_err.index_add_(0, pos, err.double().cpu())
            tok_count.index_add_(0, pos, torch.ones_like(err, dtype=torch.float64).cpu())
            fired |= (latent > 0).any(0).cpu()
            cls = pos == 0
            cls_images += (latent[cls] > 0).sum(0).cpu()
            top_cls.add(latent[cls], ids[cls, 0])
            patch = pos == cfg.patch_position
            top_patch.add(latent[patch], ids[patch, 0])
            progress.update(x.shape[0])
            if sums["tokens"] >= cfg.max_tokens:
                break
    progress.close()
    reader.close()
    if sums["tokens"] == 0:
        raise ConfigError(f"no held-out images in {store.url} for {location} (holdout {holdout}); "
                          f"train with a larger holdout or evaluate on another store")
    tokens = sums["tokens"]
    mean_x = sums["x"] / tokens
    total_var = sums["x_sq"] / tokens - float(mean_x.pow(2).sum())
    result = {
        "sae": str(ckpt or cfg.sae), "store": store.url, "location": location, "split": split, "holdout": holdout,
        "eval_tokens": sums["tokens"], "eval_images": int(tok_count[0]),
        "normalization": norm.mode,
        "mse": sums["sq_err"] / tokens,
        "explained_variance": sums["ev"] / tokens,
        "nmse": (sums["sq_err"] / tokens) / total_var if total_var > 0 else None,
        "l0": sums["l0"] / tokens,
        "dead_proportion": dead,  # CLIP-Scope's: the trainer's counters at this checkpoint
        "never_fired_proportion": float((~fired).float().mean()),
        "active_feature_proportion_cls": float((cls_images[:cfg.first_latents] >= cfg.min_images).float().mean()),
        "tokenwise_mse": (tok_err / tok_count).tolist(),
        "definitions": "docs/metrics.md; computed on the normalised activations the SAE was trained on",
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    figures = {"tokenwise": _tokenwise_png(result["tokenwise_mse"], out / "tokenwise_mse.png")}
    curves = ckpt.parent.parent / "metrics.jsonl" if ckpt is not None else None
    if curves is not None and curves.exists():
        figures["curves"] = _curves_png(curves, out / "training_curves.png")
    shown = [int(i) for i in torch.nonzero(cls_images >= min(cfg.top_n, int(tok_count[0]))).flatten()[:cfg.grid_latents]]
    grids = []
    images = _ImageFetcher(store)
    for latent_id in shown:
        for name, top in (("cls", top_cls), (f"patch{cfg.patch_position}", top_patch)):
            rows = [int(r) for r, v in zip(top.rows[:cfg.top_n, latent_id], top.values[:cfg.top_n, latent_id])
                    if r >= 0 and v > 0]
            if rows:
                path = out / "grids" / f"latent{latent_id:05d}_{name}.png"
                grid_png([images.get(r) for r in rows], path)
                grids.append({"latent": latent_id, "token": name, "file": str(path.relative_to(out)),
                              "values": [round(float(v), 4) for v in top.values[:len(rows), latent_id]]})
    result["grids"] = grids
    if cfg.sort_eval_pairs:
        from activation_store.sae.sort_eval import write_sort_eval

        result["sort_eval"] = write_sort_eval(top_cls, cls_images, cfg, images, out / "sort_eval")
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    _html(result, figures, out)
    return result


class _ImageFetcher:
    """An image of the store, by row, through its metadata: a file path (folders) or a tar member
    (webdataset shards)."""

    def __init__(self, store) -> None:
        table = store.images().to_pylist()
        self.by_row = {r["row"]: r for r in table}

    def get(self, row: int) -> Image.Image:
        meta = self.by_row.get(row)
        try:
            if meta and meta.get("url") and Path(meta["url"]).is_file():
                return Image.open(meta["url"]).convert("RGB")
            if meta and str(meta.get("source_shard", "")).endswith(".tar"):
                import fsspec

                with fsspec.open(meta["source_shard"], "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                    for m in tar:
                        if m.isfile() and m.name.split(".")[0] == meta["key"] and m.name.split(".")[-1].lower() in (
                                "jpg", "jpeg", "png", "webp"):
                            return Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
        except Exception:  # a moved or unreadable source: show a blank tile, keep the report
            pass
        return Image.new("RGB", (224, 224), (200, 200, 200))


def grid_png(imgs: list[Image.Image], path: Path, size: int = 160) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = Image.new("RGB", (3 * size, 3 * size), (255, 255, 255))
    for i, im in enumerate(imgs[:9]):
        im = im.copy()
        im.thumbnail((size, size))
        grid.paste(im, ((i % 3) * size + (size - im.width) // 2, (i // 3) * size + (size - im.height) // 2))
    grid.save(path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path.name


def _tokenwise_png(values: list[float], path: Path) -> str:
    plt = _pyplot()
    v = np.asarray(values, dtype=float)
    side = int(round(math.sqrt(len(v) - 1)))
    fig, ax = plt.subplots(figsize=(5, 4.2))
    if side * side == len(v) - 1:
        im = ax.imshow(v[1:].reshape(side, side), cmap="viridis")
        fig.colorbar(im, ax=ax, label="MSE")
        ax.set_title(f"token-wise MSE ({side}x{side} patches); CLS: {v[0]:.4g}")
    else:
        ax.plot(v)
        ax.set_title("token-wise MSE by position (0 = CLS)")
    return _save(fig, path, 100)


def _curves_png(jsonl: Path, path: Path) -> str:
    plt = _pyplot()
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    keys = [k for k in ("mse", "explained_variance", "l0", "dead_proportion", "auxk", "lr") if k in rows[0]]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, key in zip(axes.flat, keys):
        ax.plot([r["tokens"] for r in rows], [r[key] for r in rows])
        ax.set_title(key)
        ax.set_xlabel("tokens")
    return _save(fig, path, 90)


def _html(result: dict, figures: dict, out: Path) -> None:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v if not isinstance(v, float) else round(v, 6)))}</td></tr>"
                   for k, v in result.items() if k not in ("tokenwise_mse", "grids"))
    figs = "".join(f'<figure><img src="{html.escape(f)}" alt="{html.escape(k)}"><figcaption>{html.escape(k)}</figcaption></figure>'
                   for k, f in figures.items())
    grids = "".join(f'<figure><img src="{html.escape(g["file"])}" alt="latent {g["latent"]}" width="240">'
                    f'<figcaption>latent {g["latent"]}, {html.escape(g["token"])}: top {len(g["values"])} '
                    f'{html.escape(str(g["values"][:3]))}...</figcaption></figure>' for g in result["grids"])
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>SAE evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} td{{border:1px solid #ccc;padding:3px 8px}}
figure{{display:inline-block;margin:6px}}</style></head><body>
<h1>SAE evaluation: {html.escape(result['location'])}</h1>
<p>{'Held-out images (split by image)' if result['split'] == 'eval' else 'Training images (the run held out none)'}: {result['eval_images']} images, {result['eval_tokens']} tokens.</p>
<table>{rows}</table><h2>Figures</h2>{figs}<h2>Top activating images (3x3, best first)</h2>{grids}
<script>window.addEventListener("load", () => {{ const im = [...document.images];
document.body.setAttribute("data-images-loaded", im.filter(i => i.complete && i.naturalWidth > 0).length + "/" + im.length);
}});</script>
</body></html>"""
    (out / "report.html").write_text(page)
