"""The `actstore` command. Thin: parses arguments and calls the package."""

from __future__ import annotations

import argparse
import json
import sys

from activation_store.errors import ActivationStoreError


def _storage_options(args) -> dict | None:
    opts = {}
    if getattr(args, "storage_options", None):
        opts.update(json.loads(args.storage_options))
    if getattr(args, "endpoint_url", None):
        opts.setdefault("endpoint_url", args.endpoint_url)
    return opts or None


def _add_remote_args(p: argparse.ArgumentParser, what: str = "stores") -> None:
    p.add_argument("--endpoint-url", help=f"S3-compatible endpoint for s3:// {what} (e.g. http://127.0.0.1:9000)")
    p.add_argument("--storage-options", metavar="JSON",
                   help=f'fsspec options for remote {what}, e.g. \'{{"key": "...", "secret": "..."}}\'')


def _add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="store path or URL (a local directory, or s3://bucket/prefix)")
    _add_remote_args(p)


def cmd_info(args) -> int:
    from activation_store.store import open_store
    from activation_store.store.audit import format_info, info

    d = info(open_store(args.store, _storage_options(args)))
    print(json.dumps(d, indent=2) if args.json else format_info(d))
    return 0


def cmd_verify(args) -> int:
    from activation_store.store import open_store
    from activation_store.store.audit import verify

    store = open_store(args.store, _storage_options(args))
    problems = verify(store, workers=args.workers, progress=not args.quiet)
    if args.json:
        print(json.dumps({"ok": not problems, "problems": [{"where": p.where, "what": p.what} for p in problems]}, indent=2))
    elif problems:
        print(f"{len(problems)} problem(s) in {store.url}:")
        for p in problems:
            print(f"  {p}")
    else:
        print(f"{store.url}: OK ({len(store.committed_shards())} committed shards, {store.n_images:,} images, every checksum valid)")
    return 1 if problems else 0


def _csv_floats(value: str | None):
    return None if value is None else tuple(float(x) for x in value.split(","))


def cmd_harvest(args) -> int:
    from activation_store.harvest.config import build_config, load_config_file
    from activation_store.harvest.run import harvest

    file_values = load_config_file(args.config) if args.config else {}
    overrides = {
        "out": args.out, "urls": args.urls, "shards": args.shards, "images": args.images, "layers": args.layers,
        "batch_size": args.batch_size, "workers": args.workers, "shard_size": args.shard_size,
        "min_image_size": args.min_image_size, "rank": args.rank, "world_size": args.world_size,
        "report": args.report, "storage_options": _storage_options(args),
        "progress": False if args.no_progress else None,
        "model.model": args.model, "model.pretrained": args.pretrained, "model.seed": args.seed,
        "model.mean": _csv_floats(args.mean), "model.std": _csv_floats(args.std),
        "model.preprocess_tag": args.preprocess_tag, "model.compute_dtype": args.dtype, "model.device": args.device,
        "store.dtype": args.store_dtype, "store.codec": args.codec, "store.chunk_images": args.chunk_images,
        "store.region_images": args.region_images,
        "download.work_dir": args.download_dir, "download.number_sample_per_shard": args.urls_per_shard,
        "download.processes_count": args.download_processes, "download.thread_count": args.download_threads,
    }
    report = harvest(build_config(file_values, overrides))
    imgs, shards = report["images"], report["input_shards"]
    if shards["skipped_committed"]:
        print(f"{shards['skipped_committed']} of this rank's {shards['this_rank']} input shards were already committed: skipped")
    print(f"stored {imgs['stored']:,} of {imgs['seen']:,} images ({', '.join(f'{k} {v}' for k, v in sorted(imgs['by_status'].items()))}) "
          f"into {report['store']} at {report['images_per_s'] or 0:.1f} images/s; report: {report['report_path']}")
    if report["random_weights"]:
        print("note: the model has random weights (--pretrained none)")
    return 0


def cmd_train(args) -> int:
    from activation_store.config_file import overridden, read_config_file
    from activation_store.sae.trainer import TrainerConfig, train

    tokens = args.tokens
    if tokens is not None and tokens not in ("all", "cls", "patches"):
        tokens = [int(t) for t in tokens.split(",")]
    file_values = read_config_file(args.config, "train", TrainerConfig) if args.config else {}
    cfg = TrainerConfig.from_dict(overridden(file_values, {
        "store": args.store, "location": args.location, "out": args.out, "tokens": tokens, "n_latents": args.latents,
        "k": args.k, "batch_size": args.batch_size, "total_tokens": args.total_tokens, "lr": args.lr,
        "warmup_tokens": args.warmup_tokens, "auxk_coef": args.auxk_coef, "k_aux": args.k_aux,
        "dead_tokens": args.dead_tokens, "relu": False if args.no_relu else None, "autocast": args.autocast,
        "checkpoint_every_tokens": args.checkpoint_every, "normalize": args.normalize, "holdout": args.holdout,
        "buffer_tokens": args.buffer_tokens, "seed": args.seed, "device": args.device,
        "wandb": True if args.wandb else None, "storage_options": _storage_options(args),
    }))
    result = train(cfg)
    last = result["last"]
    print(f"trained {result['tokens']:,} tokens in {result['steps']:,} steps"
          + (f" (resumed from {result['resumed_from']})" if result["resumed_from"] else "")
          + (f": mse {last['mse']:.4g}, explained variance {last['explained_variance']:.3f}, L0 {last['l0']:.1f}, "
             f"dead {last['dead_proportion']:.4f}" if last else "") + f"; checkpoint {result['checkpoint']}"
          + (f" [rank {result['rank']} of {result['world_size']}, ranks in sync: {result['ranks_in_sync']}]"
             if result["world_size"] > 1 else ""))
    return 0


def cmd_eval(args) -> int:
    from activation_store.sae.evaluate import EvalConfig, evaluate

    result = evaluate(EvalConfig(sae=args.sae, store=args.store, location=args.location, normalize=args.normalize,
                                 out=args.out, max_tokens=args.max_tokens,
                                 batch_size=args.batch_size, device=args.device,
                                 storage_options=_storage_options(args)))
    print(f"{result['location']}: mse {result['mse']:.4g}, explained variance {result['explained_variance']:.3f}, "
          f"nmse {result['nmse']:.3f}, L0 {result['l0']:.1f} on {result['eval_images']} "
          f"{'held-out' if result['split'] == 'eval' else 'training (the run held out none)'} images; "
          f"report {args.out}/report.html")
    return 0


def cmd_demo(args) -> int:
    from activation_store.demo import run_demo

    return run_demo(args.out, device=args.device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="actstore",
        description="Store ViT activations once in Zarr, and read them back for SAE training.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="summarise a store: locations, images, dtype, codec, bytes, shards, statistics",
                       description="Summarise a store: locations, images and tokens, dtype and codec, bytes on disk "
                       "and per value, committed and pending input shards, per-location statistics.")
    _add_store_args(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("verify", help="check every checksum, commit and metadata table; exit 1 on any problem",
                       description="Check every chunk's crc32c checksum, that every committed input shard has all "
                       "its chunks, statistics and image-metadata rows. Lists each problem with its chunk or shard "
                       "and exits 1 if there is any.")
    _add_store_args(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--workers", type=int, default=8, help="parallel chunk reads (default 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("harvest", help="run an open_clip ViT over images and store its residual stream",
                       description="Run an open_clip ViT once over URLs (via img2dataset), webdataset shards or an "
                       "image folder, and store the residual stream of the requested layers. Resumable: rerun the same "
                       "command after a crash. Split across processes with --rank/--world-size (or torchrun/SLURM "
                       "variables).")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--urls", help="parquet or csv URL list (url and caption columns), downloaded with img2dataset")
    src.add_argument("--shards", help="webdataset tars: a path, URL or brace pattern (data/{00000..00099}.tar)")
    src.add_argument("--images", help="a folder of images (searched recursively)")
    p.add_argument("--out", help="the store (local path or s3://...); created, or resumed if it exists")
    p.add_argument("--layers", help="0-indexed blocks to store, e.g. 2,5,8,11,14,17,20,22 (the default)")
    p.add_argument("--model", help="open_clip model name, local-dir:PATH, or a model-config .json (default ViT-L-14)")
    p.add_argument("--pretrained", help="pretrained tag (default laion2b_s32b_b82k), a weights file, or none for random weights")
    p.add_argument("--seed", type=int, help="seed of random weights (--pretrained none)")
    p.add_argument("--mean", help="preprocessing mean R,G,B (needed with a weights file)")
    p.add_argument("--std", help="preprocessing std R,G,B (needed with a weights file)")
    p.add_argument("--preprocess-tag", help="with a weights file: use this pretrained tag's preprocessing")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="compute dtype of the ViT (default fp32)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=int, help="decode processes (default 4; 0 decodes in this process)")
    p.add_argument("--store-dtype", choices=["fp16", "bf16", "fp32"], help="storage dtype (default fp16)")
    p.add_argument("--codec", help="codec preset: none (default), zstd, shuffle-zstd, bitround-shuffle-zstd")
    p.add_argument("--chunk-images", type=int, help="images per chunk (default 16)")
    p.add_argument("--region-images", type=int, help="shard region alignment and CLS chunk size (default 1024)")
    p.add_argument("--shard-size", type=int, help="images per input shard for --images (default 1000)")
    p.add_argument("--min-image-size", type=int, help="drop images smaller than this many pixels on a side (default 2)")
    p.add_argument("--urls-per-shard", type=int, help="URLs per input shard for --urls (default 1000)")
    p.add_argument("--download-dir", help="where img2dataset writes shards (default beside the store)")
    p.add_argument("--download-processes", type=int, help="img2dataset processes (default 2)")
    p.add_argument("--download-threads", type=int, help="img2dataset threads per process (default 16)")
    p.add_argument("--rank", type=int, help="this process's rank (default $RANK or $SLURM_PROCID or 0)")
    p.add_argument("--world-size", type=int, help="number of processes (default $WORLD_SIZE or $SLURM_NTASKS or 1)")
    p.add_argument("--config", help="TOML or YAML file with these settings; flags override it")
    p.add_argument("--report", help="JSON report path ({rank} is replaced; default beside the store)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_remote_args(p, "stores and shards")
    p.set_defaults(func=cmd_harvest)

    p = sub.add_parser("train", help="train a TopK SAE on one location of a store (resumable)",
                       description="Train a TopK SAE (OpenAI's recipe: AuxK, unit-norm decoder, Adam with warm-up "
                       "and decay) on shuffled tokens of one location. Checkpoints every --checkpoint-every tokens; "
                       "rerunning the same command resumes from the newest checkpoint.")
    p.add_argument("store", nargs="?", help="store path or URL (or `store` in --config)")
    _add_remote_args(p)
    p.add_argument("--config", help="TOML or YAML file with TrainerConfig's fields (top level or a [train] "
                   "table); flags override it")
    p.add_argument("--location", help="e.g. resid_22")
    p.add_argument("--out", help="run folder: checkpoints/, metrics.jsonl")
    p.add_argument("--tokens", help="all, cls, patches, or token indices 0,5,9 (default all)")
    p.add_argument("--latents", type=int, help="number of latents (default 65536)")
    p.add_argument("--k", type=int, help="active latents per token (default 32)")
    p.add_argument("--batch-size", type=int, help="default 4096")
    p.add_argument("--total-tokens", type=int, help="default 1.2e9")
    p.add_argument("--lr", type=float, help="default 2e-4 / sqrt(latents / 2^14)")
    p.add_argument("--warmup-tokens", type=int, help="default 10M")
    p.add_argument("--auxk-coef", type=float, help="default 1/32")
    p.add_argument("--k-aux", type=int, help="dead latents AuxK uses per token (default d_in / 2)")
    p.add_argument("--dead-tokens", type=int, help="silent this long = dead (default 10M)")
    p.add_argument("--no-relu", action="store_true", help="keep negative top-k values (as CLIP-Scope's SAEs)")
    p.add_argument("--autocast", choices=["auto", "bf16", "off"], help="bf16 autocast: auto = on CUDA only (default)")
    p.add_argument("--checkpoint-every", type=int, help="tokens between checkpoints (default 100M)")
    p.add_argument("--normalize", choices=["none", "standardize", "unit_mean_sq_norm"],
                   help="default unit_mean_sq_norm")
    p.add_argument("--holdout", type=float, help="share of images kept for evaluation (default 0.05)")
    p.add_argument("--buffer-tokens", type=int, help="default 2^19")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate an SAE checkpoint on held-out images: metrics, plots, image grids, HTML",
                       description="Evaluate a checkpoint written by `actstore train` on the images held out of "
                       "training (split by image): CLIP-Scope's metrics (docs/metrics.md), a token-wise MSE heatmap, "
                       "training curves, top-9 image grids per latent, and OUT/report.html. Another SAE (a CLIP-Scope "
                       ".pt file, a SAELens folder) is evaluated on every image of STORE at --location.")
    p.add_argument("sae", help="run folder (its newest checkpoint), checkpoint folder (RUN/checkpoints/<tokens>), "
                   "CLIP-Scope .pt file or SAELens folder")
    p.add_argument("store", nargs="?", help="store (default: the one the SAE was trained on)")
    p.add_argument("--location", help="e.g. resid_22 (default: the one the SAE was trained on)")
    p.add_argument("--normalize", choices=["none", "standardize", "unit_mean_sq_norm"],
                   help="default: the training run's normaliser; standardize for a CLIP-Scope file (their "
                   "per-batch standardisation, with the store's statistics); none for a SAELens folder")
    p.add_argument("--out", default="eval", help="output folder (default eval)")
    p.add_argument("--max-tokens", type=int, default=2_000_000)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    _add_remote_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="the README's demo: bundled photos -> harvest -> store -> SAE -> eval report",
                       description="Harvest the bundled CC0 photos with ViT-L-14 (random weights when the "
                       "pretrained ones are not on this machine) into OUT/store.zarr, show info and verify, read "
                       "it back shuffled, train a small TopK SAE on the deepest layer and write its evaluation "
                       "report to OUT/eval/report.html.")
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ActivationStoreError as exc:
        print(f"actstore: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
