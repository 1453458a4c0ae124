"""Our SAEs against the real SAELens (6.54) and CLIP-Scope packages, both ways: what we export
loads in theirs and computes the same forward; what they save loads in ours and computes the same
forward, or is refused with a clear error where a TopKSAE cannot express it."""

import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import clipscope.sae
from clipscope.sae import TopKSAE as ClipScopeTopKSAE
from sae_lens import SAE
from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting
from sae_lens.saes.abstopk_sae import AbsTopKSAE, AbsTopKSAEConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.saes.topk_sae import TopKSAE as SAELensTopKSAE
from sae_lens.saes.topk_sae import TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.activation_scaler import ActivationScaler

from activation_store.errors import CheckpointError
from activation_store.readers import Normalizer
from activation_store.sae import io, saelens
from activation_store.sae.model import TopKSAE, export_clipscope, export_saelens, load_clipscope, load_sae
from activation_store.store.stats import Moments

TOL = 1e-5
D, N, K = 96, 1024, 24
CS_K = 640  # CLIP-Scope's SAEs: k large enough that some top-k values are negative


# ---------------------------------------------------------------------------- comparing
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def near_ties(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Rows whose k-th and (k+1)-th pre-activations are within rounding of each other: there two
    float32 computations of the same SAE may pick different latents, and neither is wrong."""
    top = pre.detach().double().topk(k + 1, dim=-1).values
    return (top[:, k - 1] - top[:, k]) <= 1e-5 * pre.detach().abs().max()


def assert_parity(ours: dict, latent, recon, k: int) -> dict:
    """Our forward_verbose `ours` equals (latent, recon) within TOL relative. Rows whose chosen
    latents differ must be near ties (at most 1% of them), and are left out of the comparison."""
    latent = latent.reshape(ours["latent"].shape)
    recon = recon.reshape(ours["reconstruction"].shape)
    differ = ((ours["latent"] != 0) != (latent != 0)).any(dim=-1)
    assert bool(near_ties(ours["pre_activations"], k)[differ].all()), "latents differ beyond a near tie"
    assert float(differ.float().mean()) <= 0.01
    keep = ~differ
    got = {"latent": rel(ours["latent"][keep], latent[keep]),
           "reconstruction": rel(ours["reconstruction"][keep], recon[keep]), "ties": int(differ.sum())}
    assert got["latent"] <= TOL and got["reconstruction"] <= TOL, got
    PARITY.append({**got, "test": os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split(" ")[0]})
    return got


PARITY: list = []  # every comparison's numbers (printed with -s at the end of the module)


def perturbed_sae(d=D, n=N, k=K, seed=0, **options) -> TopKSAE:
    """A TopKSAE with random biases and decoder rows of uneven norm (nothing lines up by chance)."""
    sae = TopKSAE(d, n, k, seed=seed, **options)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(n, 1, generator=g) * 2 + 0.3)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.5)
        sae.b_enc.copy_(torch.randn(n, generator=g) * 0.1)
    return sae


def activations(rows=256, d=D, seed=3) -> torch.Tensor:
    """Activations with a per-channel offset and scale, as a ViT's residual stream has."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, d, generator=g) * (torch.rand(d, generator=g) * 3 + 0.5) + torch.randn(d, generator=g)


# ---------------------------------------------------------------------------- ours -> SAELens
def test_a_relu_sae_behind_a_standardize_normaliser_exports_to_saelens_exactly(tmp_path):
    sae = perturbed_sae()
    x = activations()
    norm = Normalizer.from_moments("standardize", Moments.of(x.double().numpy()))
    sae.input_space, sae.normalizer = "normalized", norm
    folder = export_saelens(sae, tmp_path / "saelens", hook_name="resid_22", model_name="ViT-L-14")

    theirs = SAE.load_from_disk(folder, device="cpu")
    assert isinstance(theirs, SAELensTopKSAE) and theirs.cfg.k == K
    # 6.x metadata, where 6.x reads it: not taken for a pre-6.0 cfg (which would add prepend_bos=True)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert handle_config_defaulting(dict(cfg)) == cfg
    assert theirs.cfg.metadata.hook_name == "resid_22" and theirs.cfg.metadata.model_name == "ViT-L-14"
    assert theirs.cfg.metadata.prepend_bos is None

    ours = sae.folded(norm)
    with torch.no_grad():
        mine = ours.forward_verbose(x)
        latent = theirs.encode(x)
        assert_parity(mine, latent, theirs(x), K)
        assert rel(theirs.decode(mine["latent"]), mine["reconstruction"]) <= TOL
        # and what the normalised-space SAE computes around its normaliser
        assert rel(mine["reconstruction"], norm.inverse(sae(norm.apply(x)))) <= 1e-4
    # back into ours: the same SAE
    with torch.no_grad():
        assert_parity(load_sae(folder).forward_verbose(x), mine["latent"], mine["reconstruction"], K)


def test_an_sae_without_encoder_bias_exports_zeros_for_it(tmp_path):
    sae = perturbed_sae(encoder_bias=False)  # its b_enc holds noise that its forward ignores
    theirs = SAE.load_from_disk(export_saelens(sae, tmp_path / "f"), device="cpu")
    x = activations()
    with torch.no_grad():
        assert_parity(sae.forward_verbose(x), theirs.encode(x), theirs(x), K)


def test_saelens_export_refuses_a_no_relu_sae(tmp_path):
    sae = perturbed_sae(relu=False)
    with pytest.raises(CheckpointError, match=r"SAELens cannot represent this SAE.*relu=False.*export_clipscope"):
        export_saelens(sae, tmp_path / "f")
    assert not (tmp_path / "f").exists()
    # why: SAELens's TopK applies a ReLU, so the same weights would compute another SAE
    no_relu, relu = perturbed_sae(k=CS_K, relu=False), perturbed_sae(k=CS_K)
    theirs = SAE.load_from_disk(export_saelens(relu, tmp_path / "relu"))
    x = activations()
    with torch.no_grad():
        assert (no_relu.encode(x) < 0).any()
        assert rel(theirs.encode(x), relu.encode(x)) <= TOL and rel(theirs.encode(x), no_relu.encode(x)) > 0.1


# ---------------------------------------------------------------------------- SAELens -> ours
def randomise_(sae, rescale_norms: bool = False, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    d, n = sae.cfg.d_in, sae.cfg.d_sae
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, n, generator=g) / math.sqrt(d))
        norms = torch.rand(n, 1, generator=g) * 2.5 + 0.2 if rescale_norms else 1.0
        sae.W_dec.copy_(torch.randn(n, d, generator=g) / math.sqrt(d) * norms)
        sae.b_enc.copy_(torch.randn(n, generator=g) * 0.2)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.5)


def saved(sae, folder):
    sae.save_model(folder)
    return folder


def correlated(rows, d, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, d, generator=g) @ torch.randn(d, d, generator=g) / math.sqrt(d)) * 2 + 1


class Batches:
    def __init__(self, d, seed=7):
        self.d, self.i = d, seed

    def __iter__(self):
        return self

    def __next__(self):
        self.i += 1
        return correlated(512, self.d, self.i)


def plain(tmp_path, **cfg):
    sae = SAELensTopKSAE(TopKSAEConfig(d_in=D, d_sae=N, k=K, **cfg))
    randomise_(sae, rescale_norms=cfg.get("rescale_acts_by_decoder_norm", False))
    return saved(sae, tmp_path / "f"), sae


def their_forward(sae, x):
    with torch.no_grad():
        return sae.encode(x), sae(x)


CASES = {
    "topk": {},
    "apply_b_dec_to_input=False": {"apply_b_dec_to_input": False},
    "rescale_acts_by_decoder_norm": {"rescale_acts_by_decoder_norm": True},
    "rescale + apply_b_dec_to_input=False": {"rescale_acts_by_decoder_norm": True, "apply_b_dec_to_input": False},
}


@pytest.mark.parametrize("case", list(CASES))
def test_saelens_topk_folders_load_with_their_forward(tmp_path, case):
    folder, sae = plain(tmp_path, **CASES[case])
    theirs = SAE.load_from_disk(folder)
    x = activations()
    latent, recon = their_forward(theirs, x)
    with torch.no_grad():
        assert_parity(load_sae(folder).forward_verbose(x), latent, recon, K)


def test_a_saelens_training_checkpoint_with_decoder_norm_rescaling_loads_with_their_forward(tmp_path):
    cfg = TopKTrainingSAEConfig(d_in=D, d_sae=N, k=K, apply_b_dec_to_input=False)
    assert cfg.rescale_acts_by_decoder_norm  # the training default
    sae = TopKTrainingSAE(cfg)
    randomise_(sae, rescale_norms=True)
    folder = saved(sae, tmp_path / "ckpt")
    x = activations()
    latent, recon = their_forward(sae, x)
    with torch.no_grad():
        assert_parity(load_sae(folder).forward_verbose(x), latent, recon, K)
        # and their inference model of the same folder agrees
        assert rel(SAE.load_from_disk(folder)(x), recon) <= TOL


def test_a_hook_z_saelens_sae_is_the_same_sae_on_the_flat_vector(tmp_path):
    heads, d_head = 8, 12
    folder, _ = plain(tmp_path, reshape_activations="hook_z", metadata=SAEMetadata(hook_name="blocks.3.attn.hook_z"))
    theirs = SAE.load_from_disk(folder)
    x = activations(d=heads * d_head)
    latent, recon = their_forward(theirs, x.reshape(-1, heads, d_head))
    assert recon.shape == (len(x), heads, d_head)
    with torch.no_grad():
        assert_parity(load_sae(folder).forward_verbose(x), latent, recon, K)


def test_a_bfloat16_saelens_sae_loads_with_the_weights_they_load(tmp_path):
    sae = SAELensTopKSAE(TopKSAEConfig(d_in=D, d_sae=N, k=K, dtype="bfloat16"))
    randomise_(sae)
    folder = saved(sae, tmp_path / "f")
    assert load_file(folder / "sae_weights.safetensors")["W_enc"].dtype == torch.bfloat16
    theirs = SAE.load_from_disk(folder).to(torch.float32)  # their weights, computed in float32 as ours
    x = activations()
    latent, recon = their_forward(theirs, x)
    with torch.no_grad():
        assert_parity(load_sae(folder).forward_verbose(x), latent, recon, K)


def test_an_expected_average_checkpoint_folds_its_saved_scaling_factor(tmp_path):
    folder, _ = plain(tmp_path, normalize_activations="expected_average_only_in", apply_b_dec_to_input=False)
    scaler = ActivationScaler(scaling_factor=0.37)
    scaler.save(str(folder / "activation_scaler.json"))
    theirs = SAE.load_from_disk(folder)
    x = activations()
    with torch.no_grad():
        latent, recon = theirs.encode(scaler(x)), scaler.unscale(theirs(scaler(x)))
        ours = load_sae(folder)
        assert_parity(ours.forward_verbose(x), latent, recon, K)
        theirs.fold_activation_norm_scaling_factor(0.37)  # their own fold agrees
        assert rel(theirs(x), recon) <= TOL


def test_a_whitened_checkpoint_folds_its_saved_whitening(tmp_path):
    d = 64
    sae = SAELensTopKSAE(TopKSAEConfig(d_in=d, d_sae=512, k=16, normalize_activations="covariance_whitening",
                                       rescale_acts_by_decoder_norm=True))
    randomise_(sae, rescale_norms=True)
    folder = saved(sae, tmp_path / "f")
    scaler = ActivationScaler()
    scaler.estimate_whitening(d_in=d, data_provider=Batches(d), n_batches_for_norm_estimate=8)
    scaler.save(str(folder / "activation_scaler.json"))
    assert (folder / "activation_whitening.safetensors").is_file()
    theirs = SAE.load_from_disk(folder)
    x = correlated(256, d, seed=99)
    with torch.no_grad():
        latent, recon = theirs.encode(scaler(x)), scaler.unscale(theirs(scaler(x)))
        assert_parity(load_sae(folder).forward_verbose(x), latent, recon, 16)


def test_a_saelens_5_finetuning_scale_is_folded_into_the_decoder(tmp_path):
    folder, sae = plain(tmp_path)
    s = torch.rand(N, generator=torch.Generator().manual_seed(5)) + 0.5
    weights = load_file(folder / "sae_weights.safetensors")
    save_file({**weights, "scaling_factor": s}, str(folder / "sae_weights.safetensors"))
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "finetuning_scaling_factor": True}))
    x = activations()
    with torch.no_grad():
        latent = sae.encode(x)  # SAELens <= 5 decoded (z * s) @ W_dec + b_dec
        assert_parity(load_sae(folder).forward_verbose(x), latent, (latent * s) @ sae.W_dec + sae.b_dec, K)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not set finetuning_scaling_factor"):
        load_sae(folder)


def test_a_pre_6_saelens_cfg_is_read_as_saelens_reads_it(tmp_path):
    folder, sae = plain(tmp_path, apply_b_dec_to_input=False)
    old = {"architecture": "standard", "d_in": D, "d_sae": N, "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": K}, "apply_b_dec_to_input": False, "normalize_activations": False,
           "hook_point": "blocks.2.hook_resid_post", "hook_point_head_index": None, "dtype": "float32"}
    (folder / "cfg.json").write_text(json.dumps(old))
    x = activations()
    latent, recon = their_forward(SAE.load_from_disk(folder), x)
    with torch.no_grad():
        assert_parity(load_sae(folder).forward_verbose(x), latent, recon, K)


def _refusal_folders(tmp_path):
    def topk(**cfg):
        return plain(tmp_path, **cfg)[0]

    def other(cls, cfg):
        return saved(cls(cfg), tmp_path / "f")

    def edited(change, **cfg):
        folder = topk(**cfg)
        change(folder)
        return folder

    def cfg_edit(**entries):
        def change(folder):
            cfg = json.loads((folder / "cfg.json").read_text())
            (folder / "cfg.json").write_text(json.dumps({**cfg, **entries}))
        return change

    def zero_row(folder):
        w = load_file(folder / "sae_weights.safetensors")
        w["W_dec"][3] = 0
        save_file(w, str(folder / "sae_weights.safetensors"))

    def head_index(folder):
        cfg = json.loads((folder / "cfg.json").read_text())
        cfg["metadata"]["hook_head_index"] = 2
        (folder / "cfg.json").write_text(json.dumps(cfg))

    return {
        "standard": (lambda: other(StandardSAE, StandardSAEConfig(d_in=D, d_sae=N)), r"'standard' SAE"),
        "gated": (lambda: other(GatedSAE, GatedSAEConfig(d_in=D, d_sae=N)), r"'gated' SAE"),
        "jumprelu": (lambda: other(JumpReLUSAE, JumpReLUSAEConfig(d_in=D, d_sae=N)), r"'jumprelu' SAE.*threshold"),
        "abstopk": (lambda: other(AbsTopKSAE, AbsTopKSAEConfig(d_in=D, d_sae=N, k=K)),
                    r"'abstopk'.*ranks latents by \|pre-activation\|"),
        "batchtopk": (lambda: other(BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig(d_in=D, d_sae=N, k=K)),
                      r"'batchtopk'.*whole batch"),
        "constant_norm_rescale": (lambda: topk(normalize_activations="constant_norm_rescale"),
                                  r"normalize_activations='constant_norm_rescale'"),
        "layer_norm": (lambda: topk(normalize_activations="layer_norm"), r"normalize_activations='layer_norm'"),
        "expected_average without its factor": (lambda: topk(normalize_activations="expected_average_only_in"),
                                                r"does not hold \(activation_scaler.json\).*fold_activation_norm"),
        "whitening without its statistics": (lambda: topk(normalize_activations="covariance_whitening"),
                                             r"holds no activation_whitening.safetensors"),
        "hook_head_index": (lambda: edited(head_index), r"one attention head \(hook_head_index=2\)"),
        "relu_after_topk=false": (lambda: edited(cfg_edit(relu_after_topk=False)),
                                  r"relu_after_topk=false.*export_clipscope"),
        "a zero decoder row with rescaling": (lambda: edited(zero_row, rescale_acts_by_decoder_norm=True),
                                              r"1 decoder rows are zero"),
        "unknown tensors": (lambda: edited(lambda f: save_file({**load_file(f / "sae_weights.safetensors"),
                                                                "threshold": torch.zeros(N)},
                                                               str(f / "sae_weights.safetensors"))),
                            r"has \['threshold'\]"),
    }


REFUSALS = list(_refusal_folders(None))


@pytest.mark.parametrize("case", REFUSALS)
def test_saelens_folders_a_topk_sae_cannot_express_are_refused(tmp_path, case):
    make, message = _refusal_folders(tmp_path)[case]
    folder = make()
    with pytest.raises(CheckpointError, match=message) as err:
        load_sae(folder)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------- ours <-> CLIP-Scope
def clipscope_like(seed=0, d=D, n=N, k=CS_K) -> TopKSAE:
    return perturbed_sae(d, n, k, seed=seed, relu=False, encoder_bias=False)


def their_clipscope(path) -> ClipScopeTopKSAE:
    ckpt = torch.load(path, weights_only=True)
    sae = ClipScopeTopKSAE(k=ckpt["k"], n_features=ckpt["n_features"], d_in=ckpt["d_in"], device="cpu")
    sae.load_state_dict(ckpt["model_state_dict"])
    return sae


def assert_clipscope_parity(ours: TopKSAE, theirs: ClipScopeTopKSAE, x: torch.Tensor) -> None:
    with torch.no_grad():
        mine, out = ours.forward_verbose(x), theirs.forward_verbose(x)
    assert_parity(mine, out["latent"], out["reconstruction"], ours.k)
    assert torch.equal(mine["active_latents"], out["active_latents"])
    assert (out["latent"] < 0).any()  # their top-k keeps negative values, and so does ours


def test_our_clipscope_export_loads_in_clipscope_with_the_same_forward(tmp_path, monkeypatch):
    sae = clipscope_like()
    x = activations()
    norm = Normalizer.from_moments("standardize", Moments.of(x.double().numpy()))
    dead = torch.arange(N, dtype=torch.float32)
    path = export_clipscope(sae, tmp_path / "22_resid" / "1200.pt", norm,
                            meta={"token_count": 1200, "n_iter": 7, "log_id": "run-a", "dead_latents": dead})
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt["model_state_dict"]) == {"pre_b", "enc", "dec"}
    assert all(v.dtype == torch.float32 for v in ckpt["model_state_dict"].values())
    assert (ckpt["k"], ckpt["n_features"], ckpt["d_in"], ckpt["token_count"], ckpt["n_iter"], ckpt["log_id"]) == \
        (CS_K, N, D, 1200, 7, "run-a")
    assert torch.equal(ckpt["dead_latents"], dead)
    assert not list(path.parent.glob(".*tmp*"))  # written through a temporary file, renamed

    raw = sae.folded(norm)
    assert_clipscope_parity(raw, their_clipscope(path), x)
    # their from_pretrained, with the hub download pointed at our file
    monkeypatch.setattr(clipscope.sae, "hf_hub_download", lambda repo_id, filename, repo_type: str(path))
    assert_clipscope_parity(raw, ClipScopeTopKSAE.from_pretrained("22_resid/1200.pt", device="cpu"), x)

    # back through our reader: the same SAE and the same trainer fields
    back = load_clipscope(path)
    with torch.no_grad():
        assert_parity(back.forward_verbose(x), *(raw.forward_verbose(x)[key] for key in ("latent", "reconstruction")),
                      CS_K)
    assert back.clipscope_meta["token_count"] == 1200 and back.clipscope_meta["log_id"] == "run-a"
    assert torch.equal(back.clipscope_meta["dead_latents"], dead)


def test_write_clipscope_takes_our_tensors_and_defaults_the_trainer_fields(tmp_path):
    sae = clipscope_like(seed=4, d=64, n=512, k=320)
    tensors = {k: v.detach() for k, v in sae.state_dict().items()}
    path = io.write_clipscope(tensors, sae.cfg, tmp_path / "a.pt")
    ckpt = torch.load(path, weights_only=True)
    assert (ckpt["token_count"], ckpt["n_iter"], ckpt["log_id"]) == (0, 0, "activation-store")
    assert torch.equal(ckpt["dead_latents"], torch.zeros(512))
    assert_clipscope_parity(sae, their_clipscope(path), activations(d=64))


def test_a_clipscope_checkpoint_round_trips_through_ours(tmp_path):
    torch.manual_seed(0)
    theirs = ClipScopeTopKSAE(k=CS_K, n_features=N, d_in=D, device="cpu")  # their own initialisation
    with torch.no_grad():
        theirs.dec.add_(torch.randn(N, D) * 0.05)
    original = tmp_path / "theirs.pt"
    torch.save({"model_state_dict": theirs.state_dict(), "k": CS_K, "n_features": N, "d_in": D,
                "token_count": 1200013184, "dead_latents": torch.ones(N), "n_iter": 3, "log_id": "xyz"}, original)
    ours = load_clipscope(original)
    x = activations()
    assert_clipscope_parity(ours, theirs, x)
    again = export_clipscope(ours, tmp_path / "again.pt")  # its own meta: their trainer's fields
    a, b = torch.load(original, weights_only=True), torch.load(again, weights_only=True)
    for key in ("pre_b", "enc", "dec"):
        assert torch.equal(a["model_state_dict"][key], b["model_state_dict"][key])
    assert {k: v for k, v in a.items() if k not in ("model_state_dict", "dead_latents")} == \
        {k: v for k, v in b.items() if k not in ("model_state_dict", "dead_latents")}
    assert torch.equal(a["dead_latents"], b["dead_latents"])


def test_clipscope_layout_refuses_an_encoder_bias_or_a_relu(tmp_path):
    biased = perturbed_sae(k=CS_K, relu=False, encoder_bias=True)
    with pytest.raises(CheckpointError, match=r"no encoder bias.*b_enc is nonzero.*export_saelens"):
        export_clipscope(biased, tmp_path / "b.pt")
    relu = perturbed_sae(encoder_bias=False)
    with pytest.raises(CheckpointError, match=r"ReLU after the top-k.*keeps negative values.*export_saelens"):
        export_clipscope(relu, tmp_path / "r.pt")
    assert not list(tmp_path.iterdir())
    # an encoder bias that is all zeros is no bias: written, and equal
    with torch.no_grad():
        biased.b_enc.zero_()
    path = export_clipscope(biased, tmp_path / "z.pt")
    assert_clipscope_parity(biased, their_clipscope(path), activations())


def test_read_state_still_tells_the_formats_apart(tmp_path):
    sae = clipscope_like(d=64, n=512, k=16)
    pt = export_clipscope(sae, tmp_path / "c.pt")
    relu = perturbed_sae(64, 512, 16)
    folder = export_saelens(relu, tmp_path / "s")
    assert saelens.is_saelens(folder) and not saelens.is_saelens(pt.parent)
    assert not load_sae(pt).cfg.relu and load_sae(folder).cfg.relu
    assert np.isfinite(load_sae(folder).W_enc.detach().numpy()).all()


def test_zz_parity_numbers():
    """Not a check: the largest relative differences measured above (run with -s to see them)."""
    assert PARITY
    print(f"\nparity over {len(PARITY)} comparisons: latent {max(p['latent'] for p in PARITY):.3g}, "
          f"reconstruction {max(p['reconstruction'] for p in PARITY):.3g}, rows at a near tie "
          f"{sum(p['ties'] for p in PARITY)}")
    for p in PARITY:
        print(f"  {p['test']}: latent {p['latent']:.2g}, reconstruction {p['reconstruction']:.2g}")
