"""What resizing at download time (img2dataset's `resize_mode`) costs in parity, and what it saves.

For each setting, every image goes through img2dataset's own `Resizer` (the code a `--urls` harvest
runs with `--download-resize-mode ... --download-image-size ...`: OpenCV resize, JPEG re-encode at
its default quality 95), then through the harvest's preprocessing; the baseline, measured in the
same run, is the harvest's preprocessing of the original bytes (`--download-resize-mode no`, the
exact default). Columns: the pixel difference of the model's 224 x 224 input (uint8 levels: mean,
99th percentile, max), the relative L2 difference of the normalised input, bytes per image against
the original, and decode + preprocess images/s against the original's (one core).

Images: the bundled CC0 photos and LAION-sized (512 x 384) generated JPEGs.

    python benchmarks/download_resize_parity.py --json benchmarks/results/download_resize_parity.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from activation_store.harvest.decode import decode_image  # noqa: E402
from activation_store.harvest.model import LoadedViT, ModelConfig  # noqa: E402

TINY = str(HERE.parent / "tests" / "data" / "tiny-vit-14.json")
SAMPLES = HERE.parent / "activation_store" / "sample_images"


def images(n_generated: int) -> list[bytes]:
    from harvest_pipeline import make_jpegs

    photos = [p.read_bytes() for p in sorted(SAMPLES.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    work = Path(tempfile.mkdtemp(prefix="resize-parity-"))
    try:
        generated = [p.read_bytes() for p in make_jpegs(work, n_generated)[:16]]  # 16 distinct pictures
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return photos + generated


def decode_rate(datas: list[bytes], transform, seconds: float = 1.5) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        decode_image(datas[n % len(datas)], transform)
        n += 1
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generated", type=int, default=16, help="LAION-sized generated JPEGs besides the photos")
    ap.add_argument("--sizes", default="224,256,384", help="--download-image-size values (keep_ratio: shorter side)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from img2dataset.resizer import Resizer

    vit = LoadedViT(ModelConfig(model=TINY, pretrained="none"), [1])  # open_clip's ViT-L-14 preprocessing sizes
    mean, std = np.array(vit.preprocess["mean"]), np.array(vit.preprocess["std"])
    datas = images(args.generated)
    base = [decode_image(d, vit.transform).pixels for d in datas]
    base_rate = decode_rate(datas, vit.transform)
    rows = [{"setting": "no (original bytes, the default)", "mean_abs": 0.0, "p99_abs": 0.0, "max_abs": 0,
             "rel_l2_input": 0.0, "bytes_ratio": 1.0, "decode_ratio": 1.0}]
    for size in [int(s) for s in args.sizes.split(",")]:
        resizer = Resizer(image_size=size, resize_mode="keep_ratio", resize_only_if_bigger=False)
        resized = []
        for d in datas:
            out, _, _, _, _, err = resizer(io.BytesIO(d))
            if err is not None:
                raise SystemExit(f"img2dataset could not resize an image: {err}")
            resized.append(out)
        pix = [decode_image(r, vit.transform).pixels for r in resized]
        diffs = np.concatenate([np.abs(a.astype(np.int16) - b.astype(np.int16)).ravel() for a, b in zip(pix, base)])
        num = sum(float((((a.astype(np.float64) - b) / 255.0 / std) ** 2).sum()) for a, b in zip(pix, base))
        den = sum(float(((((b / 255.0) - mean) / std) ** 2).sum()) for b in base)
        rows.append({"setting": f"keep_ratio {size}", "mean_abs": float(diffs.mean()),
                     "p99_abs": float(np.percentile(diffs, 99)), "max_abs": int(diffs.max()),
                     "rel_l2_input": float(np.sqrt(num / den)),
                     "bytes_ratio": sum(map(len, resized)) / sum(map(len, datas)),
                     "decode_ratio": decode_rate(resized, vit.transform) / base_rate})
    print(f"{len(datas)} images ({len(datas) - min(16, args.generated)} photos, {min(16, args.generated)} generated 512x384); "
          f"model input {vit.preprocess['image_size']}, decode of the originals {base_rate:.0f} img/s on one core")
    print(f"{'download resize':34s} {'mean |d|':>9s} {'p99 |d|':>8s} {'max |d|':>8s} {'rel L2 input':>12s} "
          f"{'bytes':>6s} {'decode x':>9s}")
    for r in rows:
        print(f"{r['setting']:34s} {r['mean_abs']:9.2f} {r['p99_abs']:8.1f} {r['max_abs']:8d} {r['rel_l2_input']:12.4f} "
              f"{r['bytes_ratio']:6.2f} {r['decode_ratio']:9.2f}")
    print("|d|: uint8 levels of the model's input pixels against the original bytes' preprocessing; bytes and "
          "decode: against the originals")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": platform.platform(), "images": len(datas), "rows": rows,
                                               "original_decode_images_per_s": base_rate}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
