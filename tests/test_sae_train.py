"""The trainer: it recovers a planted dictionary, AuxK revives latents that data kills, bf16 autocast keeps float32
weights, and a SIGKILLed run resumes to the very same weights."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from activation_store.errors import ConfigError
from activation_store.sae.trainer import TrainerConfig, train
from activation_store.store import ActivationStore, ImageRecord, StoreConfig


def planted_store(path, n_samples=32768, d=64, n_features=512, k=4, tokens=16, seed=0):
    """Samples that are sums of k of n_features random unit vectors (coefficients 0.5-1.5), plus
    a little noise, stored as images of `tokens` tokens."""
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n_features, d))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    idx = np.argsort(rng.random((n_samples, n_features)), axis=1)[:, :k]
    x = np.einsum("nk,nkd->nd", rng.uniform(0.5, 1.5, (n_samples, k)), feats[idx])
    x += 0.01 * rng.standard_normal((n_samples, d))
    rows_store(path, x, tokens)
    return feats


def rows_store(path, x, tokens):
    """A store of the (n, d) rows x at location resid_0, `tokens` rows to an image."""
    images, d = len(x) // tokens, x.shape[1]
    store = ActivationStore.create(str(path), locations="resid_0", n_tokens=tokens, d_model=d,
                                   config=StoreConfig(dtype="fp32", chunk_images=64, region_images=256))
    store.plan_shards([("rows", images)])
    with store.writer("rows") as w:
        w.add({"resid_0": x[:images * tokens].reshape(images, tokens, d).astype(np.float32)},
              [ImageRecord(str(i)) for i in range(images)])


def test_trainer_recovers_a_planted_dictionary(tmp_path):
    feats = planted_store(tmp_path / "s")
    cfg = TrainerConfig(store=str(tmp_path / "s"), out=str(tmp_path / "run"), total_tokens=600_000, lr=4e-3, warmup_tokens=5000, dead_tokens=20_000, checkpoint_every_tokens=10**9, reader={"location": "resid_0", "batch_size": 256, "normalize": "none", "buffer_tokens": 8192, "threads": 2}, sae={"n_latents": 512, "k": 4})
    result = train(cfg)
    w = load_file(os.path.join(result["checkpoint"], "sae.safetensors"))["W_dec"].numpy()
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    assert (feats @ w.T).max(axis=1).mean() >= 0.95
    assert result["last"]["l0"] == 4
    from activation_store.sae import load_sae

    torch.testing.assert_close(load_sae(result["checkpoint"]).W_dec.detach(),
                               load_file(os.path.join(result["checkpoint"], "sae.safetensors"))["W_dec"])
    lines = open(tmp_path / "run" / "metrics.jsonl").read().splitlines()
    assert len(lines) >= 40 and "explained_variance" in lines[-1]


def _train_cmd(store, out):
    return [sys.executable, "-m", "activation_store.cli", "train", str(store), "--location", "resid_0",
            "--out", str(out), "--latents", "256", "--k", "4", "--batch-size", "128", "--total-tokens", "120000",
            "--lr", "2e-3", "--warmup-tokens", "2000", "--dead-tokens", "5000", "--checkpoint-every", "16000",
            "--normalize", "standardize", "--buffer-tokens", "4096"]


def test_sigkill_mid_training_then_rerun_gives_the_uninterrupted_weights(tmp_path):
    planted_store(tmp_path / "s", n_samples=16384, d=32, n_features=128)
    env = dict(os.environ, OMP_NUM_THREADS="2")
    subprocess.run(_train_cmd(tmp_path / "s", tmp_path / "ref"), check=True, capture_output=True, env=env)

    out = tmp_path / "run"
    # killed at a fixed step (300 of 938), after two checkpoints (every 125 steps) and between two
    killed = subprocess.run(_train_cmd(tmp_path / "s", out), capture_output=True,
                            env=dict(env, ACTSTORE_KILL_AT="train_step:300"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [p.name for p in sorted((out / "checkpoints").glob("[0-9]*"))] == ["0000000016000", "0000000032000"]
    rerun = subprocess.run(_train_cmd(tmp_path / "s", out), capture_output=True, text=True, env=env)
    assert rerun.returncode == 0 and "resumed from" in rerun.stdout
    final = sorted((out / "checkpoints").glob("[0-9]*"))[-1]
    want = sorted((tmp_path / "ref" / "checkpoints").glob("[0-9]*"))[-1]
    assert final.name == want.name
    got, ref = load_file(str(final / "sae.safetensors")), load_file(str(want / "sae.safetensors"))
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0)
    # the log is the uninterrupted run's: the steps logged after the last checkpoint are not repeated
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == [json.loads(line)["step"] for line in open(tmp_path / "ref" / "metrics.jsonl")]


def test_torchrun_two_processes_train_in_sync(tmp_path):
    import socket

    planted_store(tmp_path / "s", n_samples=8192, d=32, n_features=128)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "activation_store.cli", *_train_cmd(tmp_path / "s", tmp_path / "ddp")[3:]]
    cmd[cmd.index("--total-tokens") + 1] = "40000"
    env = dict(os.environ, OMP_NUM_THREADS="1", NO_PROXY="127.0.0.1,localhost")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ranks in sync: True") == 2
    final = sorted((tmp_path / "ddp" / "checkpoints").glob("[0-9]*"))[-1]
    assert (final / "reader_rank0.pt").exists() and (final / "reader_rank1.pt").exists()
    assert json.loads((final / "config.json").read_text())["world_size"] == 2


def latent_killing_store(path, n_samples=32768, d=256, tokens=16, seed=0):
    """Data on which TopK (k=1) without AuxK loses a third of its latents: every sample is one of d
    orthonormal features times a coefficient in [0.5, 1.5], and there are as many latents as
    features. As in k-means, a latent that is nobody's best match at initialisation never fires
    again, while the latents that win two features settle between them and leave both half
    explained: the residual keeps exactly the structure a dead latent could take over."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    x = rng.uniform(0.5, 1.5, (n_samples, 1)) * basis[rng.integers(0, d, n_samples)]
    x += 0.01 * rng.standard_normal((n_samples, d))
    rows_store(path, x, tokens)


def test_auxk_lowers_the_dead_fraction_on_data_built_to_kill_latents(tmp_path):
    latent_killing_store(tmp_path / "s")
    runs = {}
    for coef in (0.0, 1 / 32):
        cfg = TrainerConfig(store=str(tmp_path / "s"), out=str(tmp_path / f"run-{coef}"), total_tokens=384_000, lr=1e-3, warmup_tokens=2560, auxk_coef=coef, dead_tokens=20_000, checkpoint_every_tokens=10**9, reader={"location": "resid_0", "batch_size": 256, "normalize": "none", "holdout": 0, "buffer_tokens": 8192, "threads": 2}, sae={"n_latents": 256, "k": 1})
        train(cfg)
        runs[coef] = [json.loads(line) for line in open(tmp_path / f"run-{coef}" / "metrics.jsonl")]
    without, with_auxk = runs[0.0], runs[1 / 32]
    # measured on this machine: without AuxK 30% of the latents are dead after the first window and
    # 8-10% at the end; with AuxK 3-4% at the end (ratios 0.3-0.5 over four seeds)
    assert max(m["dead_proportion"] for m in without) >= 0.25, "the data should kill latents"
    assert without[-1]["dead_proportion"] >= 0.05
    assert with_auxk[-1]["dead_proportion"] <= 0.6 * without[-1]["dead_proportion"]
    assert with_auxk[-1]["nmse"] < 0.8 * without[-1]["nmse"], "revived latents should reconstruct what was left"


def test_bf16_autocast_trains_with_float32_weights(tmp_path):
    """`autocast="auto"` turns bf16 autocast on for CUDA; "bf16" forces the same code path here."""
    planted_store(tmp_path / "s", n_samples=8192, d=32, n_features=64)
    cfg = TrainerConfig(store=str(tmp_path / "s"), out=str(tmp_path / "run"), total_tokens=60_000, lr=3e-3, warmup_tokens=1000, dead_tokens=2_000, checkpoint_every_tokens=10**9, autocast="bf16", log_every_steps=10, reader={"location": "resid_0", "batch_size": 256, "normalize": "none", "buffer_tokens": 4096, "threads": 2}, sae={"n_latents": 128, "k": 4})
    result = train(cfg)
    weights = load_file(os.path.join(result["checkpoint"], "sae.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values())
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert logged[-1]["nmse"] < 0.5 * logged[0]["nmse"] and logged[-1]["l0"] == 4
    with pytest.raises(ConfigError, match="autocast"):
        TrainerConfig(store="s", out="o", autocast="fp8", reader={"location": "l"}).autocast_context()


def test_train_reads_a_config_file_and_flags_override_it(tmp_path, capsys):
    from activation_store.cli import main

    planted_store(tmp_path / "s", n_samples=4096, d=16, n_features=32)
    cfg = tmp_path / "train.toml"
    cfg.write_text(f'[train]\nstore = "{tmp_path / "s"}"\nout = "{tmp_path / "run"}"\n'
                   'total_tokens = 100000\nwarmup_tokens = 0\n'
                   '[train.reader]\nlocation = "resid_0"\nbatch_size = 128\nnormalize = "none"\nbuffer_tokens = 2048\n'
                   '[train.sae]\nn_latents = 64\nk = 3\n')
    assert main(["train", "--config", str(cfg), "--total-tokens", "2560", "--k", "2"]) == 0
    final = sorted((tmp_path / "run" / "checkpoints").glob("[0-9]*"))[-1]
    saved = json.loads((final / "config.json").read_text())
    assert saved["sae"]["n_latents"] == 64 and saved["sae"]["k"] == 2  # file, then the flag
    assert saved["trainer"]["total_tokens"] == 2560 and saved["trainer"]["reader"]["normalize"] == "none"

    # a 0.1 file (reader and SAE settings at the top level) still trains; YAML's 1e-3 is a string
    legacy = tmp_path / "legacy.yaml"
    legacy.write_text(f'store: {tmp_path / "s"}\nout: {tmp_path / "legacy"}\nlocation: resid_0\nn_latents: 32\n'
                      'k: 2\nbatch_size: 128\nbuffer_tokens: 2048\ntotal_tokens: 1280\nlr: 1e-3\n')
    assert main(["train", "--config", str(legacy)]) == 0
    saved = json.loads((sorted((tmp_path / "legacy" / "checkpoints").glob("[0-9]*"))[-1] / "config.json").read_text())
    assert saved["sae"]["n_latents"] == 32 and saved["trainer"]["lr"] == 1e-3
    capsys.readouterr()
    # resuming with another SAE is refused, not a size-mismatch traceback
    assert main(["train", "--config", str(legacy), "--latents", "64"]) == 2
    assert "holds an SAE of" in capsys.readouterr().err
    for bad, says in (('[train.reader]\nsplit = "eval"\n', "leave reader ['split'] unset"),
                      ('[train]\nlr = -1\n', "lr must be a positive number"),
                      ('[train]\nk_aux = "many"\n', "k_aux: cannot read 'many'"),
                      ('[train.sae]\nk = [4]\n', "sae.k must be int")):
        cfg.write_text(bad)
        assert main(["train", "--config", str(cfg)]) == 2
        assert says in capsys.readouterr().err, bad
    from activation_store import ReaderConfig

    direct = TrainerConfig(store="s", out="o", reader=ReaderConfig(location="resid_0", holdout=0.1))
    assert direct.reader.epochs is None and direct.reader.split == "train" and direct.reader.holdout == 0.1

    cfg.write_text('[train]\nlatent = 64\n')
    capsys.readouterr()
    assert main(["train", "--config", str(cfg)]) == 2
    assert "unknown keys ['latent']" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "s"), "--out", str(tmp_path / "r2")]) == 2
    assert "training needs location" in capsys.readouterr().err


@pytest.mark.parametrize("normalize", ["standardize", "unit_mean_sq_norm"])
def test_a_loaded_checkpoint_takes_raw_store_rows(tmp_path, normalize):
    """load_sae / from_pretrained on a run give an SAE on raw activations: equal to normalise -> the
    SAE as trained -> inverse, within 1e-5 relative; normalized=True gives the trained-space SAE."""
    from activation_store.sae import TopKSAE, load_sae
    from activation_store.store import open_store

    planted_store(tmp_path / "s", n_samples=4096, d=16, n_features=32)
    run = tmp_path / "run"
    train(TrainerConfig(store=str(tmp_path / "s"), out=str(run), total_tokens=6400, warmup_tokens=0,
                        reader={"location": "resid_0", "batch_size": 128, "normalize": normalize, "holdout": 0,
                                "buffer_tokens": 2048, "threads": 1}, sae={"n_latents": 64, "k": 3}))
    raw = torch.from_numpy(open_store(str(tmp_path / "s")).read_rows("resid_0").reshape(-1, 16))
    trained = load_sae(run, normalized=True)
    assert trained.input_space == "normalized" and trained.normalizer.mode == normalize
    with torch.no_grad():
        want = trained.normalizer.inverse(trained(trained.normalizer.apply(raw)))
    for sae in (load_sae(run), TopKSAE.from_pretrained(str(run))):
        assert sae.input_space == "raw"
        with torch.no_grad():
            got = sae(raw)
        assert float((got - want).norm() / want.norm()) <= 1e-5
    with torch.no_grad():
        unfolded = trained(raw)
    assert float((unfolded - want).norm() / want.norm()) > 1e-2, "the trained-space SAE must differ on raw rows"


def test_credentials_never_reach_checkpoints_or_wandb(tmp_path, monkeypatch):
    import types

    seen = {}
    fake = types.SimpleNamespace(init=lambda **kw: seen.update(kw), log=lambda *a, **kw: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    planted_store(tmp_path / "s", n_samples=2048, d=16, n_features=32)
    secret = {"key": "AKIAEXAMPLE", "secret": "s3cr3t-value", "client_kwargs": {"aws_session_token": "t0ken"}}
    result = train(TrainerConfig(store=str(tmp_path / "s"), out=str(tmp_path / "run"), total_tokens=1280,
                                 warmup_tokens=0, wandb=True, storage_options=secret,
                                 reader={"location": "resid_0", "batch_size": 128, "buffer_tokens": 2048},
                                 sae={"n_latents": 32, "k": 2}))
    written = json.dumps(seen, default=str) + open(os.path.join(result["checkpoint"], "config.json")).read()
    for value in ("AKIAEXAMPLE", "s3cr3t-value", "t0ken"):
        assert value not in written
    assert seen["config"]["storage_options"] == ["client_kwargs", "key", "secret"]  # the names only


def test_a_checkpoint_from_before_arch_resumes_as_openai(tmp_path):
    """Checkpoints written before SAEConfig.arch existed hold no arch (nor None switches): they read
    as `openai` and resume; the new checkpoint records the arch."""
    planted_store(tmp_path / "s", n_samples=2048, d=16, n_features=32)
    cfg = dict(store=str(tmp_path / "s"), out=str(tmp_path / "run"), warmup_tokens=0, checkpoint_every_tokens=1280,
               reader={"location": "resid_0", "batch_size": 128, "buffer_tokens": 2048, "threads": 1},
               sae={"n_latents": 32, "k": 2})
    train(TrainerConfig(total_tokens=1280, **cfg))
    config_file = tmp_path / "run" / "checkpoints" / "0000000001280" / "config.json"
    saved = json.loads(config_file.read_text())
    assert saved["sae"].pop("arch") == "openai"
    config_file.write_text(json.dumps(saved))
    result = train(TrainerConfig(total_tokens=2560, **cfg))
    assert result["resumed_from"].endswith("0000000001280") and result["tokens"] == 2560
    assert json.loads((tmp_path / "run" / "checkpoints" / "0000000002560" / "config.json").read_text())["sae"]["arch"] == "openai"
