"""Make tests/data/clipscope_preprocess_golden.npz: HF CLIPImageProcessor's pixel values, as
transformers 4.45.2 computes them (the version CLIP-Scope made its training activations with), for
the images of tests/clipscope_images.py.

Runs in a scratch virtual environment outside the repository (no torch needed), with the Pillow and
numpy versions of the project's own environment (the resize is Pillow's):

    python3 -m venv /tmp/hf445
    /tmp/hf445/bin/pip install transformers==4.45.2 pillow==13.0.0 numpy==2.4.6
    /tmp/hf445/bin/python scripts/make_clipscope_golden.py

The file keeps, per image, its spec, the SHA-256 of HF's float32 pixel values (3, 224, 224)
C-order bytes, and per-channel row and column sums of the uint8 levels those values came from
(where a mismatch is, when there is one): about 1 MB for ~140 images, not the pixels themselves."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from clipscope_images import SIZE, checks, golden_specs, make_image, mean_std, to_u8  # noqa: E402

WANT_TRANSFORMERS = "4.45.2"


def processor(mean, std):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": SIZE}, resample=3, do_center_crop=True,
                              crop_size=SIZE, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                              image_mean=list(mean), image_std=list(std), do_convert_rgb=True)


def check_hub_style_config_agrees() -> None:
    """A preprocessor_config.json in the legacy feature-extractor style of older hub repos (`size` and
    `crop_size` as ints, resample 3, no rescale factor, no do_convert_rgb) must read, under 4.45, as
    the explicit settings above (the mean/std are whatever the repo says; here CLIP-Scope's 0.5)."""
    from transformers import CLIPImageProcessor

    legacy = CLIPImageProcessor.from_dict({
        "crop_size": SIZE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "resample": 3, "size": SIZE,
    })
    explicit = processor([0.5] * 3, [0.5] * 3)
    keys = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
            "do_normalize", "image_mean", "image_std", "do_convert_rgb")
    diff = {k: (getattr(legacy, k), getattr(explicit, k)) for k in keys if getattr(legacy, k) != getattr(explicit, k)}
    if diff:
        raise SystemExit(f"a hub-style config does not give the explicit settings: {diff}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "tests" / "data" / "clipscope_preprocess_golden.npz"))
    ap.add_argument("--any-version", action="store_true", help="run with another transformers version (not for the "
                    "committed file)")
    args = ap.parse_args()
    import PIL
    import transformers

    if transformers.__version__ != WANT_TRANSFORMERS and not args.any_version:
        raise SystemExit(f"transformers {transformers.__version__} is installed; the golden file needs "
                         f"{WANT_TRANSFORMERS} (see this script's docstring)")
    check_hub_style_config_agrees()
    specs = golden_specs()
    hashes, row_sums, col_sums = [], [], []
    procs = {}
    for spec in specs:
        mean, std = mean_std(spec)
        proc = procs.setdefault((mean, std), processor(mean, std))
        # one image per call, as HF infers the channel layout from the first image of a call
        pv = proc(images=make_image(spec), return_tensors="np")["pixel_values"][0]
        assert pv.dtype == np.float32 and pv.shape == (3, SIZE, SIZE), (pv.dtype, pv.shape)
        hashes.append(hashlib.sha256(np.ascontiguousarray(pv).tobytes()).hexdigest())
        rows, cols = checks(to_u8(pv, mean, std))
        row_sums.append(rows)
        col_sums.append(cols)
    meta = {"transformers": transformers.__version__, "pillow": PIL.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0], "processor": processor([0.5] * 3, [0.5] * 3).to_dict(),
            "script": "scripts/make_clipscope_golden.py"}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    np.savez_compressed(args.out, specs=np.array(json.dumps(specs)), sha256=np.array(hashes),
                        row_sums=np.stack(row_sums).astype(np.uint32), col_sums=np.stack(col_sums).astype(np.uint32),
                        meta=np.array(json.dumps(meta, default=str)))
    print(f"{args.out}: {len(specs)} images, {os.path.getsize(args.out) / 1e6:.2f} MB, transformers "
          f"{transformers.__version__}, Pillow {PIL.__version__}, numpy {np.__version__}")


if __name__ == "__main__":
    main()
