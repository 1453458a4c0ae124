"""The map's rules, checked: the store imports no torch; readers and the SAE package train and
evaluate on a machine that has only the store (no open_clip, no img2dataset, no harvester)."""

import subprocess
import sys

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"open_clip", "img2dataset", "webdataset"} or name.startswith("activation_store.harvest"):
            raise ImportError(f"{name} is not installed on this trainer")
sys.meta_path.insert(0, Block())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, timeout=120)


def _tiny_store(path, n: int) -> str:
    """Code that imports the reader and writes `s`: an fp16 store of n images (5 tokens, d 8) at `path`."""
    return f"""import numpy as np
from activation_store import ShuffledReader
from activation_store.store import ActivationStore, ImageRecord, StoreConfig
s = ActivationStore.create({str(path)!r}, locations="resid_0", n_tokens=5, d_model=8,
                           config=StoreConfig(dtype="fp16", chunk_images=8, region_images=8))
s.plan_shards([("a", {n})])
with s.writer("a") as w:
    w.add({{"resid_0": np.random.default_rng(0).standard_normal(({n}, 5, 8)).astype(np.float32)}},
          [ImageRecord(str(i)) for i in range({n})])"""


def test_the_store_imports_no_torch():
    done = _run("import activation_store.store, activation_store.store.audit\n"
                "assert 'torch' not in sys.modules, 'the store imported torch'")
    assert done.returncode == 0, done.stderr


def test_readers_and_sae_need_neither_open_clip_nor_the_harvester(tmp_path):
    code = f"""
{_tiny_store(tmp_path / "s", 64)}
from activation_store.sae.trainer import TrainerConfig, train
from activation_store.sae.evaluate import EvalConfig, evaluate
from activation_store.sae import export_saelens, load_sae
r = train(TrainerConfig(store=s.url, out={str(tmp_path / "run")!r}, total_tokens=640, warmup_tokens=0,
                        reader={{"location": "resid_0", "batch_size": 32, "holdout": 0.25, "buffer_tokens": 64,
                                "threads": 1}}, sae={{"n_latents": 32, "k": 2}}))
m = evaluate(EvalConfig(sae={str(tmp_path / "run")!r}, out={str(tmp_path / "eval")!r}, top_n=1, min_images=1))
assert m["eval_images"] > 0
assert not any(n.startswith(("open_clip", "activation_store.harvest")) for n in sys.modules)
"""
    done = _run(code)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_reader_that_converts_nothing_needs_no_numba(tmp_path):
    """numba compiles the CPU's converting gather only; a reader of batches in the storage dtype
    (as on a GPU trainer, which decodes on the device) never imports it, so a GPU machine without
    it still reads."""
    code = f"""
class NoNumba(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {{"numba", "llvmlite"}}:
            raise ImportError(f"{{name}} is not installed here")
sys.meta_path.insert(0, NoNumba())
{_tiny_store(tmp_path / "s", 16)}
n = sum(len(x) for x in ShuffledReader(s, "resid_0", dtype="float16", batch_size=16, buffer_tokens=40, threads=1))
assert n == 80, n
try:
    ShuffledReader(s, "resid_0", dtype="float32", batch_size=16, buffer_tokens=40, threads=1)
except ImportError as e:
    assert "numba" in str(e) or "llvmlite" in str(e), e
else:
    raise AssertionError("the converting reader did not need numba")
"""
    done = _run(code)
    assert done.returncode == 0, done.stderr[-3000:]
