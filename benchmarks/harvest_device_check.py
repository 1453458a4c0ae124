"""On a machine with a GPU: harvest the same images with the same tiny random-weight ViT on the CPU
and on the GPU (fp32 compute and storage) and compare every stored value and statistic. Checks the
GPU path (pinned buffers, copy stream, device statistics) that CI cannot run. On CUDA it also
harvests with `cuda_graph` (full batches replayed from a captured graph) and checks that every
stored byte equals the eager GPU harvest's, for fp32 and for fp8 storage.

    python benchmarks/harvest_device_check.py --device cuda
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from activation_store.harvest.config import HarvestConfig
from activation_store.harvest.model import ModelConfig
from activation_store.harvest.run import harvest
from activation_store.store import open_store
from activation_store.store.audit import verify

HERE = Path(__file__).parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=int, default=150)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from harvest import make_photos

    import torch

    # TF32 convolutions and matmuls differ from the CPU by ~1e-3: the check is about data movement
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    work = Path(tempfile.mkdtemp(prefix="device_check_"))
    make_photos(work / "photos", args.images)
    stores = {}

    def run(device: str, store_dtype: str = "fp32", cuda_graph: bool = False):
        name = f"{device.replace(':', '')}-{store_dtype}{'-graph' if cuda_graph else ''}"
        cfg = HarvestConfig(out=str(work / f"{name}.zarr"), images=str(work / "photos"),
                            layers=[0, 2, 3], model=ModelConfig(model=str(HERE.parent / "tests" / "data" / "tiny-vit-14.json"),
                                                                 pretrained="none", device=device),
                            batch_size=32, workers=2, shard_size=64, progress=False, report=str(work / f"{name}.json"),
                            cuda_graph=cuda_graph)
        cfg.store.dtype = store_dtype
        harvest(cfg)
        return open_store(cfg.out)

    for device in ("cpu", args.device):
        stores[device] = run(device)
    a, b = stores["cpu"], stores[args.device]
    ok = a.row_ranges() == b.row_ranges() and not verify(b, progress=False)
    print(f"{'location':<10} {'max |cpu - gpu|':>16} {'max |x|':>9} {'stats mean diff':>16} {'stats var rel diff':>19}")
    for loc in a.locations:
        diff = max(float(np.abs(a.read_rows(loc, s, e) - b.read_rows(loc, s, e)).max()) for s, e in a.row_ranges())
        ma, mb = a.stats(loc), b.stats(loc)
        dmean = float(np.abs(ma.mean - mb.mean).max())
        dvar = float((np.abs(ma.var - mb.var) / ma.var).max())
        ok &= diff < 1e-4 * max(1.0, ma.max_abs) and ma.count == mb.count and dvar < 1e-4
        print(f"{loc:<10} {diff:>16.3g} {ma.max_abs:>9.3g} {dmean:>16.3g} {dvar:>19.3g}")
    if args.device.startswith("cuda"):
        for store_dtype in ("fp32", "fp8"):
            eager = b if store_dtype == "fp32" else run(args.device, store_dtype)
            graph = run(args.device, store_dtype, cuda_graph=True)
            same = _data_bytes(eager) == _data_bytes(graph) and eager.row_ranges() == graph.row_ranges()
            ok &= same
            print(f"cuda graph, {store_dtype} store: every data object {'equals' if same else 'DIFFERS from'} the eager harvest's")
    print("device check:", "OK" if ok else "FAILED")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def _data_bytes(store) -> dict:
    """Every object holding data (chunks, scales, statistics) of a store, by key."""
    return {k: store.storage.read_bytes(k) for k in store.storage.list_files("") if "/c/" in k}


if __name__ == "__main__":
    sys.exit(main())
