"""Preprocessing presets: `clipscope` equals HF CLIPImageProcessor (transformers 4.45.2) bit for bit,
`open_clip` is open_clip's own transform, they differ by a one-pixel shift when the crop margin is
3 mod 4, `auto` picks clipscope for CLIP-Scope's recipe only, and a store keeps its preset."""

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import open_clip
import PIL
import pytest
import torch
from PIL import Image

from activation_store.errors import ConfigError, StoreMismatchError
from activation_store.harvest.decode import decode_image
from activation_store.harvest.model import DEFAULT_MODEL, DEFAULT_PRETRAINED, LoadedViT, ModelConfig, preprocess_pil
from activation_store.harvest.preprocess import ClipScopeTransform, resized_size, resolve_preset
from activation_store.harvest.run import harvest
from activation_store.store import open_store
from clipscope_images import SIZE, checks, golden_specs, make_image, margin, mean_std
from harvest_helpers import TINY, TINY_NAME, cfg_for

pytestmark = pytest.mark.filterwarnings("ignore:Palette images with Transparency:UserWarning")
GOLDEN = Path(__file__).parent / "data" / "clipscope_preprocess_golden.npz"


@pytest.fixture(scope="module")
def golden():
    g = np.load(GOLDEN)
    return {"specs": json.loads(str(g["specs"])), "sha256": list(g["sha256"]), "row_sums": g["row_sums"],
            "col_sums": g["col_sums"], "meta": json.loads(str(g["meta"]))}


@pytest.fixture(scope="module")
def clipscope_vits():
    """A tiny random ViT with the clipscope preset, per normalisation the golden file uses."""
    cache = {}

    def get(mean, std):
        if (mean, std) not in cache:
            cache[mean, std] = LoadedViT(ModelConfig(model=TINY, pretrained="none", mean=mean, std=std,
                                                     preprocess="clipscope"), [0])
        return cache[mean, std]

    return get


def _float_pixels(vit: LoadedViT, u8: np.ndarray) -> np.ndarray:
    return vit.normalize(torch.from_numpy(np.array(u8[None])))[0].numpy()


def _where(u8: np.ndarray, rows_want: np.ndarray, cols_want: np.ndarray) -> str:
    """Where our crop differs from HF's, from the golden file's row and column sums."""
    rows, cols = checks(u8)
    bad_r = np.flatnonzero((rows != rows_want).any(axis=0))
    bad_c = np.flatnonzero((cols != cols_want).any(axis=0))
    shift = [d for d in (-1, 1) if np.array_equal(np.roll(cols, d, axis=1)[:, 1:-1], cols_want[:, 1:-1])
             or np.array_equal(np.roll(rows, d, axis=1)[:, 1:-1], rows_want[:, 1:-1])]
    return (f"rows {bad_r[:8].tolist()}{'...' if len(bad_r) > 8 else ''} ({len(bad_r)}) and columns "
            f"{bad_c[:8].tolist()}{'...' if len(bad_c) > 8 else ''} ({len(bad_c)}) differ, max |row sum diff| "
            f"{int(np.abs(rows.astype(np.int64) - rows_want).max())}" + (f", a shift by {shift} px matches" if shift else ""))


def test_clipscope_preset_equals_hf_clip_image_processor_4452_bit_for_bit(golden, clipscope_vits):
    meta = golden["meta"]
    assert meta["transformers"] == "4.45.2"
    failures = []
    for spec, want, rows_want, cols_want in zip(golden["specs"], golden["sha256"], golden["row_sums"],
                                               golden["col_sums"]):
        vit = clipscope_vits(*mean_std(spec))
        u8 = preprocess_pil(vit.transform, make_image(spec))
        pixels = _float_pixels(vit, u8)
        assert pixels.dtype == np.float32 and pixels.shape == (3, SIZE, SIZE)
        if hashlib.sha256(pixels.tobytes()).hexdigest() != want:
            failures.append(f"image {spec['id']} ({spec['mode']} {spec['w']}x{spec['h']}, {spec['why']}): "
                            + _where(u8, rows_want, cols_want))
    pillow_note = "" if meta["pillow"] == PIL.__version__ else (
        f" (the golden file was made with Pillow {meta['pillow']}, this is {PIL.__version__}: the resize is "
        f"Pillow's; remake it with scripts/make_clipscope_golden.py)")
    assert not failures, f"{len(failures)} of {len(golden['specs'])} images differ from HF's{pillow_note}:\n" + "\n".join(failures)
    assert len(golden["specs"]) >= 100 and {s["mode"] for s in golden["specs"]} >= {
        "RGB", "L", "LA", "RGBA", "P", "P;trns", "P;alpha", "CMYK", "I;16", "I", "F", "1"}
    assert {margin(s["w"], s["h"]) % 4 for s in golden["specs"] if s["w"] > s["h"]} == {0, 1, 2, 3}
    assert {margin(s["w"], s["h"]) % 4 for s in golden["specs"] if s["w"] < s["h"]} == {0, 1, 2, 3}


def test_golden_file_catches_open_clip_s_crop(golden):
    """A negative control: open_clip's transform (same mean/std) misses HF's pixels exactly on the RGB
    images whose margin is 3 mod 4, and the failure report finds the one-pixel shift."""
    vit = LoadedViT(ModelConfig(model=TINY, pretrained="none", mean=(0.5,) * 3, std=(0.5,) * 3), [0])
    assert vit.preset == "open_clip"
    n = 0
    for spec, want, rows_want, cols_want in zip(golden["specs"], golden["sha256"], golden["row_sums"],
                                               golden["col_sums"]):
        if spec["mode"] != "RGB" or "mean" in spec or min(spec["w"], spec["h"]) < 20:
            continue
        u8 = preprocess_pil(vit.transform, make_image(spec))
        same = hashlib.sha256(_float_pixels(vit, u8).tobytes()).hexdigest() == want
        assert same == (margin(spec["w"], spec["h"]) % 4 != 3), spec
        if not same:
            n += 1
            assert "a shift by [" in _where(u8, rows_want, cols_want)
    assert n >= 8


def test_golden_file_is_small_and_matches_the_generator(golden):
    assert os.path.getsize(GOLDEN) < 2_000_000
    specs = golden_specs()
    assert golden["specs"] == json.loads(json.dumps(specs)), "tests/clipscope_images.py changed: remake the golden file"


def test_decoded_bytes_give_the_same_pixels_as_the_image(clipscope_vits):
    """The harvest's path (bytes -> decode_image -> pixels) for every mode a file can carry."""
    vit = clipscope_vits((0.5,) * 3, (0.5,) * 3)
    seen = set()
    for spec in golden_specs():
        if spec["mode"] in seen or spec["mode"] in ("HSV", "P;trns") or "mean" in spec:
            continue  # one image per mode; TIFF cannot hold HSV; a transparent index is PNG's (below)
        seen.add(spec["mode"])
        image = make_image(spec)
        buf = io.BytesIO()
        image.save(buf, format="TIFF")
        decoded = decode_image(buf.getvalue(), vit.transform)
        assert decoded.status == "ok", (spec, decoded.error)
        np.testing.assert_array_equal(decoded.pixels, preprocess_pil(vit.transform, image), err_msg=str(spec))
        file_mode = Image.open(io.BytesIO(buf.getvalue())).mode  # TIFF keeps the mode (RGBX becomes RGB)
        assert decoded.converted_from == (None if file_mode == "RGB" else file_mode)
    spec = next(s for s in golden_specs() if s["mode"] == "P;trns")
    buf = io.BytesIO()
    make_image(spec).save(buf, format="PNG")
    np.testing.assert_array_equal(decode_image(buf.getvalue(), vit.transform).pixels,
                                  preprocess_pil(vit.transform, make_image(spec)))
    assert len(seen) >= 15


def test_open_clip_preset_is_open_clip_s_own_transform():
    vit = LoadedViT(ModelConfig(model=TINY, pretrained="none", preprocess="open_clip"), [0])
    assert vit.preset == "open_clip" and type(vit.transform).__name__ == "Compose"
    open_clip.add_model_config(TINY)
    _, _, reference = open_clip.create_model_and_transforms(TINY_NAME)
    for spec in golden_specs():
        if spec["mode"] not in ("RGB", "L", "RGBA", "P", "CMYK", "LA") or "mean" in spec or spec["id"] % 3:
            continue
        image = make_image(spec)
        got = _float_pixels(vit, preprocess_pil(vit.transform, image))
        np.testing.assert_array_equal(got, reference(image).numpy(), err_msg=str(spec))


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_presets_differ_by_a_one_pixel_shift_when_the_margin_is_3_mod_4(k):
    clipscope = ClipScopeTransform(SIZE, SIZE)
    open_clip_t = LoadedViT(ModelConfig(model=TINY, pretrained="none"), [0]).transform
    for short, tall in ((300, False), (300, True), (150, False)):
        long = next(n for n in range(short + 5, 4 * short) if margin(short, n) % 4 == k and margin(short, n) > 4)
        w, h = (short, long) if tall else (long, short)
        image = make_image({"mode": "RGB", "w": w, "h": h, "noise": 1.0, "seed": 7})
        ours, theirs = clipscope(image), preprocess_pil(open_clip_t, image)
        if k != 3:  # round((m) / 2) half to even equals floor(m / 2) unless m is 3 mod 4
            np.testing.assert_array_equal(ours, theirs)
            continue
        assert not np.array_equal(ours, theirs)
        # clipscope's crop starts one pixel earlier on the long side (floor vs round half to even)
        if tall:
            np.testing.assert_array_equal(ours[1:], theirs[:-1])
        else:
            np.testing.assert_array_equal(ours[:, 1:], theirs[:, :-1])
        rw, rh = resized_size(w, h, SIZE)
        assert (max(rw, rh) - SIZE) % 4 == 3


def test_auto_is_clipscope_for_clipscope_s_recipe_only():
    assert ModelConfig().preprocess == "auto"
    assert resolve_preset("auto", DEFAULT_MODEL, DEFAULT_PRETRAINED) == "clipscope"
    assert resolve_preset("auto", "hf-hub:laion/CLIP-ViT-L-14-laion2B-s32B-b82K", "") == "clipscope"
    assert resolve_preset("auto", "ViT-L-14", "openai") == "open_clip"
    assert resolve_preset("auto", "ViT-B-32", "laion2b_s34b_b79k") == "open_clip"
    assert resolve_preset("auto", TINY, "none") == "open_clip"
    assert resolve_preset("auto", DEFAULT_MODEL, TINY, preprocess_tag=DEFAULT_PRETRAINED) == "clipscope"  # a weights file
    assert resolve_preset("auto", DEFAULT_MODEL, TINY) == "open_clip"
    assert resolve_preset("clipscope", TINY, "none") == "clipscope"
    assert resolve_preset("open_clip", DEFAULT_MODEL, DEFAULT_PRETRAINED) == "open_clip"
    with pytest.raises(ConfigError, match="preprocessing preset"):
        ModelConfig(preprocess="hf")
    auto = LoadedViT(ModelConfig(model=TINY, pretrained="none"), [0])
    clip = LoadedViT(ModelConfig(model=TINY, pretrained="none", preprocess="clipscope"), [0])
    assert (auto.preset, clip.preset) == ("open_clip", "clipscope")
    assert isinstance(clip.transform, ClipScopeTransform)
    assert auto.fingerprint != clip.fingerprint
    assert auto.describe()["preprocess"] == "open_clip" and clip.describe()["preprocess"] == "clipscope"


def test_open_clip_fingerprint_is_unchanged_so_older_stores_resume():
    """The open_clip preset's fingerprint is the formula of stores made before presets existed."""
    vit = LoadedViT(ModelConfig(model=TINY, pretrained="none"), [0])
    h = hashlib.sha256()
    h.update(json.dumps({"model": vit.model_name, "preprocess": vit.preprocess}, sort_keys=True).encode())
    for key, t in sorted(vit.visual.state_dict().items()):
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    assert vit.fingerprint == h.hexdigest()


def test_cli_flag():
    from activation_store import cli

    argv = ["harvest", "--images", "x", "--out", "y", "--preprocess", "clipscope"]
    assert cli._config(cli.build_parser(argv).parse_args(argv), "harvest").model.preprocess == "clipscope"
    argv[-1] = "hf"
    with pytest.raises(SystemExit):
        cli.build_parser(argv).parse_args(argv)


def _tiff_folder(folder, specs) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    names = []
    for spec in specs:
        name = f"img{spec['id']:03d}.tif"
        make_image(spec).save(os.path.join(folder, name), format="TIFF")
        names.append(name)
    return names


def _drop_recorded_preset(store_path) -> None:
    """Make the store look like one made before presets existed (no `preprocess` in its model)."""
    path = Path(store_path) / "zarr.json"
    doc = json.loads(path.read_text())
    del doc["attributes"]["activation_store"]["model"]["preprocess"]
    path.write_text(json.dumps(doc))


def test_store_records_its_preset_and_resuming_keeps_it(tmp_path):
    folder = tmp_path / "imgs"
    specs = [s for s in golden_specs() if s["mode"] in ("RGB", "P", "LA") and "mean" not in s][:5]
    names = _tiff_folder(folder, specs)
    out = tmp_path / "s"
    cfg = cfg_for(out, images=str(folder), layers=[0, 2], shard_size=2, workers=1)
    cfg.model.preprocess = "clipscope"
    cfg.store.dtype = "fp32"
    report = harvest(cfg)
    assert report["images"]["stored"] == len(names) and report["model"]["preprocess"] == "clipscope"
    store = open_store(str(out))
    assert store.attrs["model"]["preprocess"] == "clipscope"
    # the decode worker used the preset: the stored rows are the forward of the clipscope pixels
    vit = LoadedViT(ModelConfig(model=TINY, pretrained="none", preprocess="clipscope"), [0, 2])
    rows = dict(zip(store.images()["key"].to_pylist(), store.images()["row"].to_pylist()))
    x = vit.normalize(torch.from_numpy(np.stack([preprocess_pil(vit.transform, Image.open(folder / n)) for n in names])))
    ref = vit.activations(x)
    for layer in (0, 2):
        got = np.stack([store.read_rows(f"resid_{layer}", rows[n], rows[n] + 1)[0] for n in names])
        np.testing.assert_array_equal(got, ref[layer].numpy())
    # resuming with auto keeps the store's preset (a tiny model alone would resolve to open_clip)
    again = harvest(cfg_for(out, images=str(folder), layers=[0, 2], shard_size=2))
    assert again["model"]["preprocess"] == "clipscope" and again["input_shards"]["skipped_committed"] == 3
    other = cfg_for(out, images=str(folder), layers=[0, 2], shard_size=2)
    other.model.preprocess = "open_clip"
    with pytest.raises(StoreMismatchError, match="preprocessing preset: store has clipscope, this run asks for open_clip"):
        harvest(other)


def test_a_store_made_before_presets_resumes_as_open_clip(tmp_path):
    folder = tmp_path / "imgs"
    _tiff_folder(folder, [s for s in golden_specs() if s["mode"] == "RGB"][:3])
    out = tmp_path / "s"
    first = harvest(cfg_for(out, images=str(folder), layers=[1], shard_size=2))
    assert first["model"]["preprocess"] == "open_clip"
    _drop_recorded_preset(out)
    assert "preprocess" not in open_store(str(out)).attrs["model"]
    assert harvest(cfg_for(out, images=str(folder), layers=[1], shard_size=2))["input_shards"]["skipped_committed"] == 2
    clip = cfg_for(out, images=str(folder), layers=[1], shard_size=2)
    clip.model.preprocess = "clipscope"
    with pytest.raises(StoreMismatchError, match="store has open_clip, this run asks for clipscope"):
        harvest(clip)
