"""`--arch clipscope` (CLIP-Scope's SAE and recipe beside OpenAI's) and `actstore export`, checked
against the real `clipscope` and `sae_lens` packages on raw store activations."""

import json

import numpy as np
import pytest
import torch

from activation_store.cli import main
from activation_store.errors import ConfigError
from activation_store.sae import load_sae
from activation_store.sae.config import SAEConfig
from activation_store.sae.model import TopKSAE
from activation_store.sae.trainer import CLIPSCOPE_LR, Trainer, TrainerConfig
from activation_store.store import ActivationStore, ImageRecord, StoreConfig, open_store

D, TOKENS = 32, 16
MODEL = {"name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}


def skewed_store(path, n_samples=8192, seed=0):
    """Sums of 3 of 96 features, then a per-channel scale (0.5-4) and shift (N(0, 3)), so that the
    run's standardisation is far from the identity and folding it into an export matters."""
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((96, D))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    idx = np.argsort(rng.random((n_samples, 96)), axis=1)[:, :3]
    x = np.einsum("nk,nkd->nd", rng.uniform(0.5, 1.5, (n_samples, 3)), feats[idx])
    x = x * rng.uniform(0.5, 4, D) + rng.normal(0, 3, D)
    images = n_samples // TOKENS
    store = ActivationStore.create(str(path), locations="resid_0", n_tokens=TOKENS, d_model=D, model=MODEL,
                                   config=StoreConfig(dtype="fp32", chunk_images=64, region_images=256))
    store.plan_shards([("rows", images)])
    with store.writer("rows") as w:
        w.add({"resid_0": x.reshape(images, TOKENS, D).astype(np.float32)}, [ImageRecord(str(i)) for i in range(images)])
    return str(path)


def train_args(store, out, *extra, tokens=16000):
    """k = 40 of 64 latents: the top-k then often reaches negative pre-activations, which
    CLIP-Scope keeps and a ReLU would zero."""
    return ["train", store, "--location", "resid_0", "--out", str(out), "--latents", "64", "--k", "40",
            "--batch-size", "128", "--total-tokens", str(tokens), "--checkpoint-every", "8000", "--buffer-tokens",
            "2048", "--threads", "1", "--normalize", "standardize", "--dead-tokens", "4000", "--holdout", "0", *extra]


def raw_rows(store):
    return torch.from_numpy(open_store(store).read_rows("resid_0").reshape(-1, D))


def one_line_error(capsys, argv, *says):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for s in says:
        assert s.lower() in err.lower(), err
    return err


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# ---------------------------------------------------------------------------- configuration
def test_arch_fixes_the_architecture_and_refuses_contradictions(tmp_path, capsys):
    c = SAEConfig(arch="clipscope", d_in=8, n_latents=16, k=2)
    assert (c.relu, c.encoder_bias, c.normalize_decoder) == (False, False, False)
    assert SAEConfig(arch="clipscope", relu=False).relu is False  # agreeing is fine
    o = SAEConfig()
    assert (o.arch, o.relu, o.encoder_bias, o.normalize_decoder) == ("openai", True, True, True)
    assert SAEConfig(relu=False).relu is False  # openai lets each be switched off (--no-relu)
    for field in ("relu", "encoder_bias", "normalize_decoder"):
        with pytest.raises(ConfigError, match=f"arch clipscope has no .*{field}=True"):
            SAEConfig(arch="clipscope", **{field: True})
    with pytest.raises(ConfigError, match="arch must be one of openai, clipscope"):
        SAEConfig(arch="anthropic")
    store = skewed_store(tmp_path / "s", n_samples=1024)
    for flag in ("--relu", "--encoder-bias", "--normalize-decoder"):
        one_line_error(capsys, train_args(store, tmp_path / "r", "--arch", "clipscope", flag), "arch clipscope has no")
    one_line_error(capsys, train_args(store, tmp_path / "r", "--arch", "x"), "invalid choice")
    assert not (tmp_path / "r").exists()


def test_each_arch_brings_its_recipe_where_nothing_was_given():
    base = {"store": "s", "out": "o", "reader": {"location": "resid_0"}}
    clip = TrainerConfig(**base, sae={"arch": "clipscope", "n_latents": 1024})
    assert clip.learning_rate() == CLIPSCOPE_LR == 9e-5
    assert (clip.warmup_tokens, clip.decay_start, clip.auxk_coef, clip.init_b_dec) == (0, 1.0, 0.0, False)
    from activation_store.sae.trainer import lr_at

    assert {lr_at(clip, t) for t in (0, 10**6, 10**9, clip.total_tokens - 1)} == {9e-5}  # constant
    openai = TrainerConfig(**base, sae={"n_latents": 2**16})
    assert openai.learning_rate() == pytest.approx(1e-4)
    assert (openai.warmup_tokens, openai.decay_start, openai.auxk_coef, openai.init_b_dec) == (10**7, 0.8, 1 / 32, True)
    given = TrainerConfig(**base, sae={"arch": "clipscope"}, lr=1e-3, warmup_tokens=5, auxk_coef=0.5, init_b_dec=True)
    assert (given.learning_rate(), given.warmup_tokens, given.auxk_coef, given.init_b_dec) == (1e-3, 5, 0.5, True)


def test_clipscope_init_is_theirs_exactly_for_the_seed(tmp_path):
    import clipscope

    for seed in (0, 7):
        torch.manual_seed(seed)
        ref = clipscope.TopKSAE(k=4, n_features=256, d_in=D, device="cpu")
        ours = TopKSAE(D, 256, 4, seed=seed, arch="clipscope")
        assert torch.equal(ours.W_enc, ref.enc) and torch.equal(ours.W_dec, ref.dec) and torch.equal(ours.b_dec, ref.pre_b)
        assert not ours.b_enc.requires_grad and not ours.b_enc.any()
    # and their formula's statistics, at a size where they are sharp
    big = TopKSAE(256, 4096, 8, seed=1, init="clipscope")
    assert big.W_enc.std().item() == pytest.approx(1 / np.sqrt(2 * 256), rel=0.01)
    assert abs(big.W_enc.mean().item()) < 1e-3 and torch.equal(big.W_dec, big.W_enc.T)
    # the trainer starts from it, seeded by the run's seed
    store = skewed_store(tmp_path / "s", n_samples=1024)
    cfg = TrainerConfig(store=store, out=str(tmp_path / "run"), reader={"location": "resid_0", "batch_size": 64,
                        "buffer_tokens": 512, "threads": 1, "seed": 3}, sae={"arch": "clipscope", "n_latents": 64, "k": 4})
    trainer = Trainer(cfg)
    try:
        want = TopKSAE(D, 64, 4, seed=3, arch="clipscope")
        for name, p in want.state_dict().items():
            assert torch.equal(trainer.sae.state_dict()[name], p), name
    finally:
        trainer.reader.close()


# ---------------------------------------------------------------------------- training, export, parity
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One store, a clipscope-arch run and an openai-arch run, trained through the CLI."""
    tmp = tmp_path_factory.mktemp("arch")
    store = skewed_store(tmp / "s")
    assert main(train_args(store, tmp / "clip", "--arch", "clipscope", "--lr", "2e-3")) == 0
    assert main(train_args(store, tmp / "openai", "--lr", "2e-3", "--warmup-tokens", "1000")) == 0
    return tmp, store


def test_a_clipscope_run_has_no_encoder_bias_no_relu_and_records_its_arch(runs, capsys):
    tmp, store = runs
    run = tmp / "clip"
    final = sorted((run / "checkpoints").glob("[0-9]*"))[-1]
    saved = json.loads((final / "config.json").read_text())
    assert saved["sae"]["arch"] == "clipscope" and saved["sae"]["relu"] is False
    assert saved["trainer"]["auxk_coef"] == 0 and saved["trainer"]["warmup_tokens"] == 0
    log = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert {m["lr"] for m in log} == {2e-3} and {m["auxk"] for m in log} == {0.0}  # constant, no AuxK
    assert log[-1]["nmse"] < 0.85 * log[0]["nmse"], "it should learn"
    from safetensors.torch import load_file

    weights = load_file(str(final / "sae.safetensors"))
    assert not weights["b_enc"].any(), "b_enc stays zero"
    assert not torch.allclose(weights["W_dec"].norm(dim=1), torch.ones(64), atol=1e-3), "no decoder normalisation"
    sae = load_sae(run)
    x = raw_rows(store)[:2048]
    with torch.no_grad():
        out = sae.forward_verbose(x)
        assert (out["topk_values"] < 0).any(), "no ReLU: some top-k latents are negative"
        sae.b_enc.normal_()  # unused: the forward ignores it
        torch.testing.assert_close(sae.forward_verbose(x)["reconstruction"], out["reconstruction"], rtol=0, atol=0)
    # resuming keeps the arch; a rerun that asks for another is refused, naming the difference
    import shutil

    run = tmp / "clip-resumed"
    shutil.copytree(tmp / "clip", run)
    capsys.readouterr()
    assert main(train_args(store, run, "--arch", "clipscope", "--lr", "2e-3", tokens=25600)) == 0
    assert "resumed from" in capsys.readouterr().out
    final = sorted((run / "checkpoints").glob("[0-9]*"))[-1]
    assert final.name == "0000000025600" and json.loads((final / "config.json").read_text())["sae"]["arch"] == "clipscope"
    one_line_error(capsys, train_args(store, run, "--lr", "2e-3", tokens=32000), "arch clipscope there, openai here")


def _wait_for_export_clipscope():
    from activation_store.sae import model

    if not hasattr(model, "export_clipscope"):
        pytest.fail("activation_store.sae.model.export_clipscope does not exist yet")


def test_clipscope_export_equals_the_run_in_the_real_clipscope_package(runs, capsys):
    import clipscope

    _wait_for_export_clipscope()
    tmp, store = runs
    out = tmp / "clip.pt"
    capsys.readouterr()
    assert main(["export", str(tmp / "clip"), "--format", "clipscope", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "token_count 16000" in printed
    ckpt = torch.load(out, weights_only=True)
    ref = clipscope.TopKSAE(k=ckpt["k"], n_features=ckpt["n_features"], d_in=ckpt["d_in"], device="cpu")
    ref.load_state_dict(ckpt["model_state_dict"])
    assert (ckpt["k"], ckpt["n_features"], ckpt["d_in"]) == (40, 64, D)
    assert ckpt["token_count"] == 16000 and ckpt["n_iter"] == 16000 // 128
    assert tuple(torch.as_tensor(ckpt["dead_latents"]).shape) == (64,)
    ours = load_sae(tmp / "clip")
    x = raw_rows(store)
    with torch.no_grad():
        want, got = ours.forward_verbose(x), ref.forward_verbose(x)
    latent_err, recon_err = rel(got["latent"], want["latent"]), rel(got["reconstruction"], want["reconstruction"])
    print(f"clipscope parity: latent rel {latent_err:.2e}, reconstruction rel {recon_err:.2e}, "
          f"max abs {float((got['reconstruction'] - want['reconstruction']).abs().max()):.2e}")
    assert latent_err <= 1e-5 and recon_err <= 1e-5
    torch.testing.assert_close(got["latent"], want["latent"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["reconstruction"], want["reconstruction"], rtol=1e-5, atol=1e-5)
    assert (got["latent"] < 0).any()
    # SAELens has no TopK without a ReLU: refused, one line, exit 2, nothing written
    one_line_error(capsys, ["export", str(tmp / "clip"), "--format", "saelens", "--out", str(tmp / "clip-sl")], "relu")
    assert not (tmp / "clip-sl" / "sae_weights.safetensors").exists()


def test_openai_export_equals_the_run_in_the_real_sae_lens(runs, capsys):
    from sae_lens import SAE

    tmp, store = runs
    folder = tmp / "openai-sl"
    capsys.readouterr()
    assert main(["export", str(tmp / "openai"), "--format", "saelens", "--out", str(folder)]) == 0
    assert str(folder) in capsys.readouterr().out
    ref = SAE.load_from_disk(str(folder), device="cpu")
    assert ref.cfg.metadata.hook_name == "blocks.0.hook_resid_post"  # resid_0: after 0-indexed block 0
    assert ref.cfg.metadata.model_name == "ViT-B-32/laion2b_s34b_b79k"  # the store's model record
    ours = load_sae(tmp / "openai")
    x = raw_rows(store)
    with torch.no_grad():
        want = ours.forward_verbose(x)
        got_latent, got_recon = ref.encode(x), ref(x)
    latent_err, recon_err = rel(got_latent, want["latent"]), rel(got_recon, want["reconstruction"])
    print(f"saelens parity: latent rel {latent_err:.2e}, reconstruction rel {recon_err:.2e}")
    assert latent_err <= 1e-5 and recon_err <= 1e-5
    # names given on the command line win
    assert main(["export", str(tmp / "openai"), "--format", "saelens", "--out", str(tmp / "named"),
                 "--hook-name", "h", "--model-name", "m"]) == 0
    named = SAE.load_from_disk(str(tmp / "named"), device="cpu").cfg.metadata
    assert (named.hook_name, named.model_name) == ("h", "m")
    # CLIP-Scope has no encoder bias and no ReLU: refused unless b_enc is exactly zero (and no ReLU)
    _wait_for_export_clipscope()
    assert load_sae(tmp / "openai").b_enc.abs().max() > 0
    one_line_error(capsys, ["export", str(tmp / "openai"), "--format", "clipscope", "--out", str(tmp / "o.pt")])
    assert not (tmp / "o.pt").exists()


def test_export_usage_mistakes_are_one_line(runs, capsys, tmp_path):
    tmp, _ = runs
    one_line_error(capsys, ["export", str(tmp / "clip"), "--out", str(tmp_path / "x")], "export needs --format")
    one_line_error(capsys, ["export", str(tmp / "clip"), "--format", "onnx", "--out", "x"], "invalid choice")
    one_line_error(capsys, ["export", str(tmp_path / "nothing"), "--format", "saelens", "--out", "x"],
                   "neither an activation-store run")
