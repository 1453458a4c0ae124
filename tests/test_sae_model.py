"""The TopK SAE, CLIP-Scope checkpoints and the metrics, against straightforward re-computations."""

import math

import numpy as np
import pytest
import torch

from activation_store.sae import CheckpointError, TopKSAE, load_clipscope
from activation_store.sae import metrics


def test_sparse_decode_equals_dense_decode():
    torch.manual_seed(0)
    sae = TopKSAE(24, 96, 5, seed=1)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(33, 24)
    values, indices, _ = sae.encode_topk(x)
    torch.testing.assert_close(sae.decode_sparse(values, indices), sae.decode(sae.encode(x)))
    assert (sae.encode(x) != 0).sum(1).max() <= 5


def make_clipscope_checkpoint(path, d=16, n=64, k=4, seed=0):
    """A checkpoint laid out as CLIP-Scope's, with their initialisation."""
    g = torch.Generator().manual_seed(seed)
    enc = torch.randn(d, n, generator=g) / math.sqrt(2) / math.sqrt(d)
    state = {"pre_b": torch.randn(d, generator=g) * 0.01, "enc": enc, "dec": enc.T.clone() + 0.01 * torch.randn(n, d, generator=g)}
    torch.save({"model_state_dict": state, "k": k, "n_features": n, "d_in": d, "token_count": 1200013184,
                "dead_latents": torch.zeros(n), "n_iter": 10, "log_id": "abc"}, path)
    return state


def clipscope_forward(state, k, x):
    """CLIP-Scope's forward, written out: no encoder bias, top-k without ReLU, dense decode."""
    pre = (x - state["pre_b"]) @ state["enc"]
    vals, idx = pre.topk(k, dim=-1)
    latent = torch.zeros_like(pre).scatter(-1, idx, vals)
    return latent, latent @ state["dec"] + state["pre_b"]


def test_clipscope_checkpoint_loads_and_reproduces_its_forward(tmp_path):
    path = tmp_path / "22_resid" / "1200013184.pt"
    path.parent.mkdir()
    state = make_clipscope_checkpoint(path, k=40)
    sae = load_clipscope(path)
    x = torch.randn(20, 16)
    want_latent, want_recon = clipscope_forward(state, 40, x)
    out = sae.forward_verbose(x)
    torch.testing.assert_close(out["latent"], want_latent)
    torch.testing.assert_close(out["reconstruction"], want_recon, rtol=1e-5, atol=1e-6)
    assert (out["latent"] < 0).any()  # CLIP-Scope keeps negative top-k values
    for key in ("latent", "reconstruction", "active_latents", "experts_chosen", "expert_prop", "expert_weighting"):
        assert key in out
    torch.testing.assert_close(out["active_latents"], want_latent.max(0).values > 1e-3)
    assert sae.clipscope_meta["token_count"] == 1200013184


def test_bad_checkpoints_raise_our_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_clipscope(tmp_path / "nope.pt")
    torch.save({"model_state_dict": {"W": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a CLIP-Scope checkpoint"):
        load_clipscope(tmp_path / "other.pt")


def test_metrics_equal_their_formulas_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]])
    x_hat = torch.tensor([[1.0, 1.0, 3.0], [1.0, -1.0, 2.0]])
    # token 0: error 1, variance around its own feature mean (2): 1 + 0 + 1 = 2
    # token 1: error 1 + 4 = 5, feature mean 1: 1 + 4 + 9 = 14
    recon = metrics.Reconstruction()
    err = recon.add(x, x_hat)
    assert err.tolist() == [1, 5]
    assert recon.mse == pytest.approx((1 + 5) / 2)
    assert recon.explained_variance == pytest.approx(((1 - 1 / 2) + (1 - 5 / 14)) / 2)
    # NMSE: mean vector (0.5, 0.5, 3.5); total squared deviation 0.25+2.25+0.25 + 0.25+2.25+0.25 = 5.5
    assert recon.nmse == pytest.approx(((1 + 5) / 2) / (5.5 / 2))
    assert float(metrics.mse_loss(x, x_hat)) == pytest.approx(recon.mse)  # the training losses: same quantities
    assert float(metrics.nmse_loss(x, x_hat)) == pytest.approx(recon.nmse)
    # streaming: two batches give what one batch of both gives
    halves = metrics.Reconstruction()
    halves.add(x[:1], x_hat[:1])
    halves.add(x[1:], x_hat[1:])
    assert halves.result() == pytest.approx(recon.result())
    l0 = metrics.L0()
    l0.add(torch.tensor([[0.0, 2.0, -1.0, 3.0], [0.5, 0.0, 0.0, 0.0]]))
    assert l0.value == pytest.approx((2 + 1) / 2)
    tw = metrics.TokenwiseMSE(3)
    tw.add(err, torch.tensor([0, 2]))
    assert tw.value[0] == 1 and math.isnan(tw.value[1]) and tw.value[2] == 5
    firing = metrics.Firing(4)
    values = torch.tensor([[1.0, 1.0]] * 9 + [[1.0, -1.0]] + [[-1.0, 0.0]] * 20)  # top-2 codes of 30 CLS tokens
    indices = torch.tensor([[0, 1]] * 10 + [[2, 1]] * 20)
    firing.add(values, indices, torch.ones(30, dtype=torch.bool))  # latent 0 fires on 10 images, latent 1 on 9
    assert firing.active_feature_proportion(first=4, min_images=10) == pytest.approx(1 / 4)
    assert firing.never_fired_proportion == pytest.approx(2 / 4)


def test_dead_latents_over_a_token_window():
    dead = metrics.DeadLatents(4, window=100)
    dead.update(torch.tensor([[0, 1]]), torch.tensor([[1.0, 0.0]]), 60)  # latent 1 "fires" with 0: not active
    assert dead.proportion() == 0
    dead.update(torch.tensor([[2]]), torch.tensor([[0.5]]), 60)
    assert dead.dead.tolist() == [False, True, False, True]  # latent 0 fired 60 tokens ago
    dead.update(torch.tensor([[1]]), torch.tensor([[2.0]]), 50)
    assert dead.dead.tolist() == [True, False, False, True] and dead.proportion() == 0.5


def test_decoder_rows_stay_unit_norm_and_gradients_lose_their_parallel_part():
    torch.manual_seed(0)
    sae = TopKSAE(8, 32, 3, seed=0)
    x = torch.randn(50, 8)
    (sae(x) - x).pow(2).sum().backward()
    sae.remove_parallel_gradient_()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert parallel.abs().max() < 1e-5 * sae.W_dec.grad.norm(dim=1).max() + 1e-6
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder_()
    np.testing.assert_allclose(sae.W_dec.norm(dim=1).detach().numpy(), 1.0, rtol=1e-5)


def test_forward_and_gradients_equal_the_written_out_formula():
    """The encoder takes b_dec's gradient a cheaper way; values and every gradient must still be
    those of x^ = ReLU(TopK((x - b_dec) W_enc + b_enc)) W_dec + b_dec."""
    torch.manual_seed(0)
    sae = TopKSAE(32, 128, 4, seed=0)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(64, 32) * 3
    (sae(x) - x).pow(2).sum().backward()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in sae.named_parameters()}
    pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    vals, idx = pre.topk(4, dim=-1)
    latent = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    (latent @ params["W_dec"] + params["b_dec"] - x).pow(2).sum().backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), latent @ params["W_dec"] + params["b_dec"], rtol=1e-5, atol=1e-5)


def test_b_dec_starts_at_the_geometric_median():
    sae = TopKSAE(2, 8, 1)
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    sae.init_b_dec_(pts, iterations=500)
    assert float(sae.b_dec.detach().norm()) < 1.0  # the mean would be ~(25, 25); the median ignores the outlier


def test_folding_the_normaliser_and_saelens_export_round_trip(tmp_path):
    from activation_store.readers import Normalizer
    from activation_store.sae import export_saelens, load_sae
    from activation_store.store.stats import Moments

    torch.manual_seed(0)
    sae = TopKSAE(12, 48, 3, seed=2)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(40, 12) * 3 + 1
    moments = Moments.of(x.double().numpy())
    for mode in ("standardize", "unit_mean_sq_norm"):
        norm = Normalizer.from_moments(mode, moments)
        want = norm.inverse(sae(norm.apply(x)))
        torch.testing.assert_close(sae.folded(norm)(x), want, rtol=1e-4, atol=1e-4)
        folder = export_saelens(sae, tmp_path / mode, norm, hook_name="resid_22")
        cfg = __import__("json").loads((folder / "cfg.json").read_text())
        assert cfg["d_in"] == 12 and cfg["d_sae"] == 48 and cfg["k"] == 3 and cfg["normalize_activations"] == "none"
        torch.testing.assert_close(load_sae(folder)(x), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(TopKSAE.from_pretrained(str(folder))(x), want, rtol=1e-4, atol=1e-4)


def test_from_pretrained_finds_clipscope_names_in_their_hub_repo(tmp_path, monkeypatch):
    """CLIP-Scope's model card loads `from_pretrained("22_resid/1200013184.pt")` with no repo; we
    resolve it in CLIP-Scope's repo through the Hugging Face cache (offline here)."""
    from huggingface_hub import constants

    from activation_store.sae.io import CLIPSCOPE_REPO

    state, k = make_clipscope_checkpoint(tmp_path / "ck.pt"), 4
    repo = tmp_path / "hub" / ("models--" + CLIPSCOPE_REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40) / "22_resid").mkdir(parents=True)
    (tmp_path / "ck.pt").rename(repo / "snapshots" / ("0" * 40) / "22_resid" / "1200013184.pt")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)

    x = torch.randn(5, 16)
    got = TopKSAE.from_pretrained("22_resid/1200013184.pt")(x)
    torch.testing.assert_close(got, clipscope_forward(state, k, x)[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match="cannot fetch 22_resid/9.pt from lewington/CLIP-ViT-L-scope"):
        TopKSAE.from_pretrained("22_resid/9.pt")
