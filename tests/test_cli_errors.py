"""Every error type of ours reaches a CLI user as one line on stderr and exit code 2, never a
traceback; real mistakes land on the type that names them."""

import inspect

import pytest

from activation_store import errors
from activation_store.cli import main
from store_helpers import make_store, write_shard

ERROR_TYPES = [cls for _, cls in inspect.getmembers(errors, inspect.isclass)
               if issubclass(cls, errors.ActivationStoreError)]


def test_every_error_type_lives_in_errors_and_shares_one_base():
    import activation_store

    assert len(ERROR_TYPES) >= 20
    for module in ("store.activation_store", "harvest.model", "harvest.run", "sae.model", "sae.io", "sae.saelens", "sae.checkpoint"):
        mod = __import__(f"activation_store.{module}", fromlist=["_"])
        own = [n for n, c in inspect.getmembers(mod, inspect.isclass)
               if issubclass(c, Exception) and c.__module__ == mod.__name__ and not n.startswith("_")]
        assert own == [], f"{module} defines exception types {own}; they belong in activation_store.errors"
    assert activation_store.ActivationStoreError is errors.ActivationStoreError


@pytest.mark.parametrize("error", ERROR_TYPES, ids=lambda c: c.__name__)
def test_each_error_type_is_one_line_and_exit_2(error, monkeypatch, capsys, tmp_path):
    import activation_store.store.audit as audit

    def fail(*_args, **_kwargs):
        raise error("first line of the message\n  second line: what to do")

    monkeypatch.setattr(audit, "info", fail)
    store = make_store(str(tmp_path / "s"))
    assert main(["info", store.url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("actstore: error: first line of the message second line")
    assert "Traceback" not in err


def _one_line(capsys, argv, expect: str):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert expect in err, err


def test_real_mistakes_give_our_errors(tmp_path, capsys):
    store = make_store(str(tmp_path / "s"), locations="resid_0")
    store.plan_shards([("a", 8)])
    write_shard(store, "a", seed=0, n=8)
    _one_line(capsys, ["info", str(tmp_path / "nothing")], "no activation store")
    _one_line(capsys, ["train", store.url, "--location", "resid_9", "--out", str(tmp_path / "r")], "no location 'resid_9'")
    _one_line(capsys, ["train", store.url, "--out", str(tmp_path / "r")], "training needs location")
    _one_line(capsys, ["eval", str(tmp_path / "nothing")], "neither an activation-store run")
    _one_line(capsys, ["train", store.url, "--location", "resid_0", "--out", str(tmp_path / "r"), "--batch-size",
                       "4096", "--latents", "8", "--k", "2"], "fewer than one batch")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    _one_line(capsys, ["harvest", "--images", str(tmp_path), "--out", str(tmp_path / "h"), "--config", str(bad)],
              "use .toml, .yaml or .yml")
    (tmp_path / "cfg.toml").write_text("[train]\nreader = 3\n")
    _one_line(capsys, ["train", "--config", str(tmp_path / "cfg.toml")], "expected a table of settings")
    assert str(errors.UnknownLocationError("no location x")) == "no location x"  # not KeyError's quoted form


def test_bad_values_of_every_kind_are_one_line(tmp_path, capsys):
    store = make_store(str(tmp_path / "s"), locations="resid_0")
    store.plan_shards([("a", 8)])
    write_shard(store, "a", seed=0, n=8)
    base = ["train", store.url, "--location", "resid_0", "--out", str(tmp_path / "r")]
    _one_line(capsys, base + ["--device", "cuda"], "no CUDA GPU")
    _one_line(capsys, base + ["--tokens", "abc"], "tokens are all, cls, patches or token indices")
    _one_line(capsys, base + ["--checkpoint-every", "0"], "checkpoint_every_tokens must be >= 1")
    _one_line(capsys, base + ["--lr", "-1"], "lr must be a positive number")
    _one_line(capsys, base + ["--lr", "nan"], "lr must be a positive number")
    _one_line(capsys, base + ["--latentz", "8"], "unrecognized arguments: --latentz")
    _one_line(capsys, ["eval", str(tmp_path / "r"), "--device", "cuda:3"], "device 'cuda:3'")
    listing = tmp_path / "list.yaml"
    listing.write_text("- store: x\n- out: y\n")
    _one_line(capsys, ["train", "--config", str(listing)], "must hold a table of settings")
    tagged = tmp_path / "tag.yaml"
    tagged.write_text("store: !!python/object/apply:os.system ['echo pwned']\n")
    _one_line(capsys, ["train", "--config", str(tagged)], "does not parse")
