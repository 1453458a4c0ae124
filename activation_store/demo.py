"""The README's demo. For now (the harvest lands with issue 3) it writes synthetic ViT-like
activations through the store's writer API as two input shards, then shows `info` and `verify`."""

from __future__ import annotations

import shutil
from pathlib import Path

from activation_store.store import ActivationStore, ImageRecord, StoreConfig
from activation_store.store.audit import format_info, info, verify
from activation_store.synthetic import synthetic_activations


def run_demo(out: str) -> int:
    out_dir = Path(out)
    store_path = out_dir / "store.zarr"
    if store_path.exists():
        shutil.rmtree(store_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    locations = ["resid_2", "resid_11", "resid_22"]
    store = ActivationStore.create(
        str(store_path), locations=locations, n_tokens=257, d_model=256,
        config=StoreConfig(dtype="fp16", codec="none", chunk_images=16, region_images=64),
        model={"name": "synthetic", "pretrained": "none", "note": "synthetic activations until the harvest exists"},
    )
    shards = [("demo-000", 48), ("demo-001", 32)]
    store.plan_shards(shards)
    for seed, (source, n) in enumerate(shards):
        with store.writer(source) as w:
            for start in range(0, n, 8):
                acts = {loc: synthetic_activations(seed * 1000 + start + li, 8, 257, 256)
                        for li, loc in enumerate(locations)}
                w.add(acts, [ImageRecord(key=f"{source}/{start + i:04d}", source_shard=source, source_row=start + i)
                             for i in range(8)])
    print(format_info(info(store)))
    problems = verify(store, progress=False)
    print(f"\nverify: {'OK' if not problems else problems}")
    print(f"\nstore written to {store_path}; inspect it with `actstore info {store_path}`")
    return 0 if not problems else 1
