"""The statistics a harvest records are those of the values it stored (float64 reference), and an
image whose activations are not finite is dropped, counted, and left out of them."""

import numpy as np
import pytest
import torch

from activation_store.harvest import pipeline
from activation_store.harvest.model import LoadedViT
from activation_store.harvest.run import harvest
from activation_store.store import open_store
from activation_store.store.stats import Moments
from harvest_helpers import cfg_for, make_images


def _assert_stats_of_stored_values(store, expected_images: int):
    for loc in store.locations:
        x = store.read_rows(loc).astype(np.float64)  # the stored (rounded) values, every committed row
        assert x.shape[0] == expected_images
        groups = store.stats_by_group(loc)
        for name, part in (("cls", x[:, :1]), ("patches", x[:, 1:])):
            ref, got = Moments.of(part), groups[name]
            assert got.count == ref.count
            np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-6, atol=1e-7 * np.abs(ref.mean).max())
            np.testing.assert_allclose(got.m2, ref.m2, rtol=1e-5)
            np.testing.assert_array_equal(got.absmax, ref.absmax)


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32", "fp8"])
def test_recorded_statistics_are_those_of_the_stored_values(tmp_path, dtype):
    make_images(tmp_path / "imgs", 11)
    cfg = cfg_for(tmp_path / "s", images=str(tmp_path / "imgs"))
    cfg.store.dtype = dtype
    harvest(cfg)
    _assert_stats_of_stored_values(open_store(str(tmp_path / "s")), 11)


@pytest.mark.parametrize("dtype", ["fp16", "fp8"])
def test_an_image_with_nan_activations_is_dropped_counted_and_kept_out_of_the_statistics(tmp_path, monkeypatch, dtype):
    make_images(tmp_path / "imgs", 10)
    original = LoadedViT.forward
    calls = {"n": 0}

    def forward_with_a_nan(self, x, sink):
        calls["n"] += 1

        def poisoned(layer, tokens):
            if calls["n"] == 2 and layer == 3:  # the second batch's second image, deepest layer only
                tokens = tokens.clone()
                tokens[1, 5, 7] = float("nan")
            sink(layer, tokens)

        return original(self, x, poisoned if sink is not None else None)

    monkeypatch.setattr(LoadedViT, "forward", forward_with_a_nan)
    cfg = cfg_for(tmp_path / "s", images=str(tmp_path / "imgs"))
    cfg.store.dtype = dtype
    report = harvest(cfg)
    store = open_store(str(tmp_path / "s"))
    assert report["images"]["by_status"].get("nonfinite_activation") == 1
    images = store.images(include_dropped=True).to_pylist()
    assert [r["key"] for r in images if r["status"] == "nonfinite_activation"] == ["img004.jpg"]
    _assert_stats_of_stored_values(store, 9)


def test_device_moments_flag_exactly_the_images_that_are_not_finite():
    acts = torch.randn(2, 4, 9, 8).half()
    acts[1, 2, 0, 3] = float("inf")
    acts[0, 0, 5, 1] = float("nan")
    _, _, bad = pipeline._device_moments(acts)
    assert bad.tolist() == [True, False, True, False]
    _, counts, bad = pipeline._device_moments(torch.randn(2, 4, 9, 8))
    assert not bad.any() and counts.tolist() == [[4, 32], [4, 32]]


def test_an_fp8_harvest_stores_the_codes_of_the_float32_activations_and_their_measured_error(tmp_path):
    """The device quantises what an fp32 harvest of the same images stores: the same codes and
    scales as the store's own numpy encoder gives for those values, and the error it records is
    the error of exactly those codes."""
    from activation_store.store.encoding import dequantize_fp8, quantize_fp8

    make_images(tmp_path / "imgs", 7)
    stores = {}
    for dtype in ("fp32", "fp8"):
        cfg = cfg_for(tmp_path / dtype, images=str(tmp_path / "imgs"))
        cfg.store.dtype = dtype
        harvest(cfg)
        stores[dtype] = open_store(str(tmp_path / dtype))
    exact, fp8 = stores["fp32"], stores["fp8"]
    assert fp8.dtype == "fp8"
    for loc in exact.locations:
        x = exact.read_rows(loc)
        codes, scales = quantize_fp8(x)
        np.testing.assert_array_equal(fp8.read_rows(loc, raw=True), codes)
        np.testing.assert_array_equal(fp8.read_scales(loc), scales)
        stored = dequantize_fp8(codes, scales)
        np.testing.assert_array_equal(fp8.read_rows(loc), stored)
        e = fp8.lossy_error(loc)
        assert e["complete"]
        np.testing.assert_allclose(e["max_abs"], np.abs(stored - x).max(), rtol=1e-6)
        rel_rmse = np.sqrt(((stored.astype(np.float64) - x) ** 2).sum() / (x.astype(np.float64) ** 2).sum())
        np.testing.assert_allclose(e["relative_rmse"], rel_rmse, rtol=1e-5)
