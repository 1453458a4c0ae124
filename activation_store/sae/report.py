"""The evaluation report, and only here: images fetched back from the store's metadata, 3x3 image
grids, the token-wise MSE heatmap, training curves and the HTML page (sort-eval uses the grids)."""

from __future__ import annotations

import html
import io
import json
import math
from pathlib import Path

import fsspec
import numpy as np
from PIL import Image

from activation_store.store.images import decode_text
from activation_store.tar_shards import image_of, read_sample


class ImageFetcher:
    """An image of the store, by row, read back from where its bytes live.

    Stores of format 1.1 record that in the image table: `data_url` (the image file, or the tar or
    img2dataset shard holding it) with `data_offset`/`data_size` (the bytes' range; -1 for a whole
    file), read with one ranged request, local or remote. 1.0 stores fall back to the file path in
    `url`, or to the tar named by `source_shard`, searched by key. A tile that cannot be found is
    grey and counted by reason (`missing`), and the report says how many there were."""

    def __init__(self, store, storage_options: dict | None = None) -> None:
        table = store.images().to_pylist()
        self.by_row = {r["row"]: r for r in table}
        self.storage_options = storage_options
        self.missing: dict[str, int] = {}

    def get(self, row: int) -> Image.Image:
        meta = self.by_row.get(row)
        try:
            data = self._bytes(meta) if meta else None
            if data is None:
                return self._grey("no recorded location" if meta else "row not in the image table")
            return Image.open(io.BytesIO(data)).convert("RGB")
        except FileNotFoundError:
            return self._grey("source file gone")
        except Exception as exc:  # unreadable or not decodable: a grey tile, counted by cause
            return self._grey(f"unreadable ({type(exc).__name__})")

    def _bytes(self, meta: dict) -> bytes | None:
        url, offset, size = meta.get("data_url"), meta.get("data_offset"), meta.get("data_size")
        if url and meta.get("percent_encoded"):
            url = decode_text(url)
        if url:
            fs, path = fsspec.core.url_to_fs(url, **(self.storage_options or {}))
            if offset is not None and offset >= 0 and size is not None and size >= 0:
                return fs.cat_file(path, start=offset, end=offset + size)
            return fs.cat_file(path)
        if meta.get("url") and Path(meta["url"]).is_file():  # 1.0 stores: folder harvests
            return Path(meta["url"]).read_bytes()
        if str(meta.get("source_shard", "")).endswith(".tar"):  # 1.0 stores: webdataset tars
            return image_of(read_sample(meta["source_shard"], meta["key"], self.storage_options) or {})
        return None

    def _grey(self, reason: str) -> Image.Image:
        self.missing[reason] = self.missing.get(reason, 0) + 1
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


def tokenwise_png(values: list[float], path: Path) -> str:
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


def _log_rows(jsonl: Path) -> list[dict]:
    """The training log's lines; a line cut by a kill (the last one) is skipped."""
    rows = []
    for line in jsonl.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in rows if isinstance(r, dict) and "tokens" in r]


def curves_png(jsonl: Path, path: Path) -> str | None:
    """Training curves from metrics.jsonl; None when the log has no line yet."""
    rows = _log_rows(jsonl)
    if not rows:
        return None
    plt = _pyplot()
    keys = [k for k in ("mse", "explained_variance", "l0", "dead_proportion", "auxk", "lr") if k in rows[0]]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, key in zip(axes.flat, keys):
        ax.plot([r["tokens"] for r in rows], [r[key] for r in rows])
        ax.set_title(key)
        ax.set_xlabel("tokens")
    return _save(fig, path, 90)


def write_html(result: dict, figures: dict, out: Path) -> None:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v if not isinstance(v, float) else round(v, 6)))}</td></tr>"
                   for k, v in result.items() if k not in ("tokenwise_mse", "grids", "missing_tiles"))
    missing = result.get("missing_tiles") or {}
    warning = (f'<p class="warning">{sum(missing.values())} image tiles could not be loaded (grey): '
               + html.escape(", ".join(f"{n} {why}" for why, n in sorted(missing.items()))) + "</p>") if missing else ""
    figs = "".join(f'<figure><img src="{html.escape(f)}" alt="{html.escape(k)}"><figcaption>{html.escape(k)}</figcaption></figure>'
                   for k, f in figures.items())
    grids = "".join(f'<figure><img src="{html.escape(g["file"])}" alt="latent {g["latent"]}" width="240">'
                    f'<figcaption>latent {g["latent"]}, {html.escape(g["token"])}: top {len(g["values"])} '
                    f'{html.escape(str(g["values"][:3]))}...</figcaption></figure>' for g in result["grids"])
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>SAE evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} td{{border:1px solid #ccc;padding:3px 8px}}
figure{{display:inline-block;margin:6px}} .warning{{color:#a40}}</style></head><body>
<h1>SAE evaluation: {html.escape(result['location'])}</h1>
<p>{'Held-out images (split by image)' if result['split'] == 'eval' else 'Training images (the run held out none)'}: {result['eval_images']} images, {result['eval_tokens']} tokens.</p>
<table>{rows}</table><h2>Figures</h2>{figs}<h2>Top activating images (3x3, best first)</h2>{warning}{grids}
<script>window.addEventListener("load", () => {{ const im = [...document.images];
document.body.setAttribute("data-images-loaded", im.filter(i => i.complete && i.naturalWidth > 0).length + "/" + im.length);
}});</script>
</body></html>"""
    (out / "report.html").write_text(page)
