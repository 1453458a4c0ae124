"""The README's demo, the whole flow on the bundled CC0 photos: harvest (ViT-L-14, eight layers) ->
store -> info and verify -> a shuffled read -> train a small TopK SAE on the deepest layer ->
evaluate it on held-out images -> HTML report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from activation_store.harvest.config import DEFAULT_LAYERS, HarvestConfig
from activation_store.harvest.model import DEFAULT_MODEL, DEFAULT_PRETRAINED, ModelConfig, pretrained_reachable
from activation_store.harvest.run import harvest
from activation_store.store import open_store
from activation_store.store.audit import format_info, info, verify

SAMPLE_IMAGES = Path(__file__).parent / "sample_images"


def run_demo(out: str, model: str = DEFAULT_MODEL, pretrained: str = DEFAULT_PRETRAINED, device: str = "cpu",
             compute_dtype: str = "bf16", layers: str = DEFAULT_LAYERS, store_dtype: str = "fp16") -> int:
    """`store_dtype="fp8"`: the harvest's fp16 store is converted (`actstore convert`) to one byte per
    value, OUT/store-fp8.zarr, and everything after the harvest reads that."""
    out_dir = Path(out)
    store_path = out_dir / "store.zarr"
    for path in (store_path, out_dir / "store-fp8.zarr"):
        if path.exists():
            shutil.rmtree(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not pretrained_reachable(model, pretrained):
        print(f"{model} weights '{pretrained}' are not available on this machine (no download here): "
              f"using random weights of the same architecture; the harvest report says so.")
        pretrained = "none"
    cfg = HarvestConfig(
        out=str(store_path), images=str(SAMPLE_IMAGES), layers=layers,
        model=ModelConfig(model=model, pretrained=pretrained, device=device, compute_dtype=compute_dtype),
        batch_size=5, workers=2, shard_size=5, report=str(out_dir / "harvest-report.json"),
    )
    # ten images: small chunks and regions, so the demo store is not mostly padding
    cfg.store.chunk_images, cfg.store.region_images = 5, 5
    report = harvest(cfg)
    print(f"\nharvest: {report['images']['stored']} images stored at {report['images_per_s']:.2f} images/s "
          f"(random weights: {report['random_weights']}); report {report['report_path']}\n")
    if store_dtype != "fp16":
        from activation_store.store.convert import ConvertConfig, convert

        converted = convert(ConvertConfig(src=str(store_path), dst=str(out_dir / f"store-{store_dtype}.zarr"),
                                          store_dtype=store_dtype, progress=False))
        print(f"converted to {store_dtype}: {converted['dst']} ({converted['images']} images)\n")
        store_path = Path(converted["dst"])
    store = open_store(str(store_path))
    summary = info(store)
    (out_dir / "store-info.json").write_text(json.dumps(summary, indent=2))
    print(format_info(summary))
    problems = verify(store, progress=False)
    print(f"\nverify: {'OK' if not problems else problems}")
    from activation_store import ShuffledReader

    location = store.locations[-1]  # the deepest harvested layer (resid_22 with the defaults)
    reader = ShuffledReader(store, location, batch_size=512, seed=0, normalize="unit_mean_sq_norm", return_ids=True)
    batches = list(reader)
    tokens = sum(len(x) for x, _ in batches)
    x, ids = batches[0]
    print(f"\nread back shuffled: {tokens:,} {location} tokens in {len(batches)} batches; the first batch mixes "
          f"{len(set(ids[:, 0].tolist()))} images; E||x||^2 after unit_mean_sq_norm = "
          f"{float((x ** 2).sum(1).mean()):.0f} (d_model {store.d_model})")
    from activation_store.sae.evaluate import EvalConfig, evaluate
    from activation_store.sae.trainer import TrainerConfig, train

    run = out_dir / f"sae-{location}"
    if run.exists():
        shutil.rmtree(run)
    reader = {"location": location, "batch_size": 256, "holdout": 0.3, "buffer_tokens": 4096, "threads": 2,
              "device": device}
    trained = train(TrainerConfig(store=str(store_path), out=str(run), reader=reader, sae={"n_latents": 4096, "k": 32},
                                  total_tokens=40_000, lr=1e-3, warmup_tokens=2_000, dead_tokens=10_000,
                                  checkpoint_every_tokens=20_000))
    last = trained["last"]
    print(f"\ntrained a TopK SAE (4,096 latents, k=32) on {location}: mse {last['mse']:.4g}, explained variance "
          f"{last['explained_variance']:.3f}; checkpoint {trained['checkpoint']}")
    result = evaluate(EvalConfig(sae=trained["checkpoint"], out=str(out_dir / "eval"), batch_size=1024, top_n=9,
                                 min_images=1, device=device))
    print(f"evaluated on {result['eval_images']} held-out images: mse {result['mse']:.4g}, explained variance "
          f"{result['explained_variance']:.3f}, L0 {result['l0']:.1f}")
    print(f"\nwritten to {out_dir}/: {store_path.name}, harvest-report.json, store-info.json, {run.name}/, "
          f"eval/report.html")
    return 0 if not problems else 1
