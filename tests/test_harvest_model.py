"""The ViT side of the harvest: exact activations, early stopping, clear errors, clipscope compatibility."""

import inspect

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from activation_store.errors import ConfigError, ModelError, PretrainedUnavailableError, StoreMismatchError
from activation_store.harvest.compat import ConfiguredViT, resolve_model_name
from activation_store.harvest.config import HarvestConfig
from activation_store.harvest.model import LoadedViT, ModelConfig, preprocess_pil
from activation_store.harvest.preprocess import resolve_preset
from activation_store.harvest.run import harvest
from activation_store.store import open_store
from harvest_helpers import TINY, TINY_NAME, make_images


def reference_model(seed=0):
    """The same tiny model built straight from open_clip, as a user would."""
    open_clip.add_model_config(TINY)
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_NAME)
    return model.visual.eval(), preprocess


def reference_tokens(visual, x, layers):
    out = visual.forward_intermediates(x, indices=layers, stop_early=True, intermediates_only=True,
                                       output_fmt="NLC", output_extra_tokens=True)
    return {layer: torch.cat([p, t], dim=1) for layer, p, t in
            zip(layers, out["image_intermediates_prefix"], out["image_intermediates"])}


def harvest_cfg(out, **kw):
    cfg = HarvestConfig(out=str(out), model=ModelConfig(model=TINY, pretrained="none"), batch_size=3, workers=0,
                        progress=False, report=str(out) + ".report.json", **kw)
    cfg.store.chunk_images, cfg.store.region_images = 4, 8
    return cfg


def test_stored_activations_equal_a_direct_forward_exactly(tmp_path):
    folder = tmp_path / "imgs"
    names = make_images(folder, 7)
    cfg = harvest_cfg(tmp_path / "s", images=str(folder), layers=[0, 2, 3], shard_size=4)
    cfg.store.dtype = "fp32"
    report = harvest(cfg)
    assert report["images"]["stored"] == 7
    store = open_store(str(tmp_path / "s"))
    rows = dict(zip(store.images()["key"].to_pylist(), store.images()["row"].to_pylist()))
    visual, preprocess = reference_model()
    x = torch.stack([preprocess(Image.open(folder / n)) for n in names])
    with torch.no_grad():
        ref = reference_tokens(visual, x, [0, 2, 3])
    for layer in (0, 2, 3):
        got = np.stack([store.read_rows(f"resid_{layer}", rows[n], rows[n] + 1)[0] for n in names])
        np.testing.assert_array_equal(got, ref[layer].numpy())  # exact in fp32
    assert store.attrs["model"]["fingerprint"] and store.attrs["model"]["random_weights"] is True
    assert store.attrs["harvest_config"]["layers"] == [0, 2, 3]


def test_hooks_equal_forward_intermediates_and_later_blocks_never_run():
    vit = LoadedViT(ModelConfig(model=TINY, pretrained="none"), [0, 1])
    calls = [0] * vit.n_layers
    for i, block in enumerate(vit.visual.transformer.resblocks):
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    x = torch.randn(2, 3, 224, 224)
    acts = vit.activations(x)
    assert calls == [1, 1, 0, 0]
    assert set(acts) == {0, 1} and acts[1].shape == (2, 257, 64)
    visual, _ = reference_model()
    with torch.no_grad():
        ref = reference_tokens(visual, x, [0, 1])
    for layer in (0, 1):
        torch.testing.assert_close(acts[layer], ref[layer], rtol=0, atol=0)


def test_bad_model_requests_fail_before_any_work(tmp_path):
    with pytest.raises(ModelError, match=r"layers \[4\] are out of range.*0\.\.3"):
        LoadedViT(ModelConfig(model=TINY, pretrained="none"), [1, 4])
    resnet = tmp_path / "tiny-rn.json"
    resnet.write_text('{"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8}, '
                      '"text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}')
    with pytest.raises(ModelError, match="not a ViT"):
        LoadedViT(ModelConfig(model=str(resnet), pretrained="none"), [1])
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"x")
    with pytest.raises(ModelError, match="--mean and --std"):
        LoadedViT(ModelConfig(model=TINY, pretrained=str(weights)), [1])
    with pytest.raises(PretrainedUnavailableError, match="--pretrained none"):
        LoadedViT(ModelConfig(model=TINY, pretrained="no-such-tag"), [1])


def test_resuming_with_another_model_or_layers_is_refused(tmp_path):
    folder = tmp_path / "imgs"
    make_images(folder, 3)
    harvest(harvest_cfg(tmp_path / "s", images=str(folder), layers=[1]))
    other_seed = harvest_cfg(tmp_path / "s", images=str(folder), layers=[1])
    other_seed.model.seed = 1
    with pytest.raises(StoreMismatchError, match="different weights or preprocessing"):
        harvest(other_seed)
    other_pre = harvest_cfg(tmp_path / "s", images=str(folder), layers=[1])
    other_pre.model.mean = (0.5, 0.5, 0.5)
    with pytest.raises(StoreMismatchError, match="fingerprint"):
        harvest(other_pre)
    with pytest.raises(StoreMismatchError, match="locations"):
        harvest(harvest_cfg(tmp_path / "s", images=str(folder), layers=[1, 2]))


def test_configured_vit_returns_clipscope_keys_and_shapes():
    locations = [(1, "resid"), (3, "resid")]
    transformer = ConfiguredViT(locations, TINY, "cpu", pretrained="none")
    assert transformer.vit.preset == "clipscope"  # clipscope preprocesses with HF's CLIPImageProcessor
    image = Image.new("RGB", (224, 224), (0, 0, 0))
    acts = transformer.all_activations(image)
    assert set(acts) == set(locations)
    assert acts[locations[0]].shape == (1, 257, 64) and acts[locations[0]].dtype == torch.float32
    cls = transformer.cls_activations([image, image])
    assert cls[(3, "resid")].shape == (2, 64)
    torch.testing.assert_close(cls[(3, "resid")][0], acts[(3, "resid")][0, 0])
    # a non-square image goes through the clipscope preset (floored crop), as the harvest's would
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 305, 3), dtype=np.uint8))
    pixels = transformer.vit.normalize(torch.from_numpy(preprocess_pil(transformer.vit.transform, photo)[None]))
    torch.testing.assert_close(transformer.all_activations(photo)[(3, "resid")],
                               transformer.vit.activations(pixels)[3], rtol=0, atol=0)


def test_configured_vit_signature_is_clipscope_s():
    from clipscope.hookedvit import ConfiguredViT as TheirConfiguredViT
    from clipscope.hookedvit import HookedViT

    # clipscope: ConfiguredViT(hook_locations, *args, **kwargs) -> HookedViT(model_name=..., device='cuda')
    theirs = [inspect.signature(TheirConfiguredViT.__init__).parameters["hook_locations"],
              *list(inspect.signature(HookedViT.__init__).parameters.values())[1:]]
    ours = list(inspect.signature(ConfiguredViT.__init__).parameters.values())[1:]
    shared = [(p.name, p.default) for p in theirs]
    assert [(p.name, p.default) for p in ours[:len(shared)]] == shared
    assert shared == [("hook_locations", inspect.Parameter.empty),
                      ("model_name", "laion/CLIP-ViT-L-14-laion2B-s32B-b82K"), ("device", "cuda")]
    assert all(p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD for p in ours[:len(shared)])
    extra = ours[len(shared):]
    assert [p.name for p in extra][:3] == ["pretrained", "dtype", "seed"]
    assert all(p.kind == inspect.Parameter.KEYWORD_ONLY for p in extra)
    assert hasattr(ConfiguredViT, "all_activations") and hasattr(ConfiguredViT, "cls_activations")


def test_configured_vit_model_names_and_device():
    assert resolve_model_name("laion/CLIP-ViT-L-14-laion2B-s32B-b82K", None) == {
        "model": "ViT-L-14", "pretrained": "laion2b_s32b_b82k"}
    assert resolve_model_name("hf-hub:laion/CLIP-ViT-L-14-laion2B-s32B-b82K", None)["pretrained"] == "laion2b_s32b_b82k"
    assert resolve_model_name("laion/CLIP-ViT-L-14-laion2B-s32B-b82K", "none") == {
        "model": "ViT-L-14", "pretrained": "none"}
    assert resolve_model_name("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None) == {
        "model": "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "pretrained": ""}
    assert resolve_model_name("ViT-L-14", None) == {"model": "ViT-L-14", "pretrained": "laion2b_s32b_b82k"}
    assert resolve_model_name(TINY, "none") == {"model": TINY, "pretrained": "none"}
    with pytest.raises(ConfigError, match="pretrained=TAG"):
        resolve_model_name(TINY, None)
    # the clipscope id resolves to CLIP-Scope's recipe, whose preset is clipscope
    cfg = ModelConfig(**resolve_model_name("laion/CLIP-ViT-L-14-laion2B-s32B-b82K", None))
    assert resolve_preset(cfg.preprocess, cfg.model, cfg.pretrained) == "clipscope"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available; pass device='cpu'"):
            ConfiguredViT([(1, "resid")], TINY, pretrained="none")  # clipscope's default device is cuda
    with pytest.raises(ConfigError, match="only 'resid'"):
        ConfiguredViT([(1, "mlp")], TINY, "cpu", pretrained="none")
