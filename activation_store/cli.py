"""The `actstore` command. Thin: the flags of harvest, train, eval and export are derived from their
config dataclasses (configs.add_arguments), so each setting, default and help text is written once."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from activation_store import configs
from activation_store.errors import ActivationStoreError, ConfigError

def _storage_options(args) -> dict | None:
    opts = {}
    if getattr(args, "storage_options", None):
        try:
            opts.update(json.loads(args.storage_options))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--storage-options is not JSON: {exc}") from exc
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


def _config(args, section: str):
    """The command's config: dataclass defaults, then --config FILE, then the flags given."""
    cls = _config_type(args.config_type)
    overrides = configs.overrides_from_args(args, cls)
    opts = _storage_options(args)
    if opts:
        overrides["storage_options"] = opts
    return configs.load(cls, getattr(args, "config", None), section, overrides)


def cmd_info(args) -> int:
    from activation_store.store import open_store
    from activation_store.store.audit import format_info, info

    d = info(open_store(args.store, _storage_options(args)))
    print(json.dumps(d, indent=2) if args.json else format_info(d))
    return 0


def cmd_verify(args) -> int:
    from activation_store.store import open_store
    from activation_store.store.audit import format_verify, verify

    store = open_store(args.store, _storage_options(args))
    report = verify(store, workers=args.workers, progress=not args.quiet)
    print(json.dumps(report.to_json(), indent=2) if args.json else format_verify(store.url, report))
    return 1 if report else 0


def cmd_harvest(args) -> int:
    from activation_store.harvest.run import harvest

    report = harvest(_config(args, "harvest"))
    imgs, shards = report["images"], report["input_shards"]
    if shards["skipped_committed"]:
        print(f"{shards['skipped_committed']} of this rank's {shards['this_rank']} input shards were already committed: skipped")
    print(f"stored {imgs['stored']:,} of {imgs['seen']:,} images ({', '.join(f'{k} {v}' for k, v in sorted(imgs['by_status'].items()))}) "
          f"into {report['store']} at {report['images_per_s'] or 0:.1f} images/s; report: {report['report_path']}")
    if report["random_weights"]:
        print("note: the model has random weights (--pretrained none)")
    return 0


def cmd_train(args) -> int:
    from activation_store.sae.trainer import train

    result = train(_config(args, "train"))
    last = result["last"]
    print(f"trained {result['tokens']:,} tokens in {result['steps']:,} steps"
          + (f" (resumed from {result['resumed_from']})" if result["resumed_from"] else "")
          + (f": mse {last['mse']:.4g}, explained variance {last['explained_variance']:.3f}, L0 {last['l0']:.1f}, "
             f"dead {last['dead_proportion']:.4f}" if last else "") + f"; checkpoint {result['checkpoint']}"
          + (f" [rank {result['rank']} of {result['world_size']}, ranks in sync: {result['ranks_in_sync']}]"
             if result["world_size"] > 1 else ""))
    return 0


def cmd_eval(args) -> int:
    from activation_store.sae.evaluate import evaluate

    cfg = _config(args, "eval")
    result = evaluate(cfg)
    print(f"{result['location']}: mse {result['mse']:.4g}, explained variance {result['explained_variance']:.3f}, "
          f"nmse {_fmt(result['nmse'])}, L0 {result['l0']:.1f} on {result['eval_images']} "
          f"{'held-out' if result['split'] == 'eval' else 'training (the run held out none)'} images; "
          f"report {cfg.out}/report.html")
    return 0


def cmd_export(args) -> int:
    from activation_store.sae.export import export

    r = export(_config(args, "export"))
    names = (f"hook {r['hook_name'] or '-'}, model {r['model_name'] or '-'}" if r["format"] == "saelens" else
             ", ".join(f"{k} {v}" for k, v in r["meta"].items()) or "no training metadata")
    print(f"wrote {r['sae']} as {r['format']} to {r['path']} ({names}; normaliser folded in: takes raw activations)")
    for note in r["notes"]:
        print(f"note: {note}")
    return 0


def cmd_convert(args) -> int:
    from activation_store.store.convert import convert

    r = convert(_config(args, "convert"))
    print(f"converted {r['converted']} of {r['shards']} committed input shards of {r['src']} into {r['dst']} "
          f"({r['dtype']}, codec {r['codec']}; {r['skipped_committed']} were already converted): {r['images']:,} images"
          + (f"; {r['uncommitted_in_src']} uncommitted shards of the source were left out" if r["uncommitted_in_src"]
             else ""))
    return 0


def _fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def cmd_demo(args) -> int:
    from activation_store.demo import run_demo

    return run_demo(args.out, device=args.device, store_dtype=args.store_dtype)


def _config_type(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _config_command(sub, wanted: str | None, name: str, func, config: str, help: str, description: str,
                    config_help: str, remote: str = "stores") -> None:
    """A command whose flags are its config dataclass's fields. They are derived only for the
    command being run, so `actstore info` never imports torch for the trainer's flags."""
    p = sub.add_parser(name, help=help, description=description)
    if wanted == name:
        configs.add_arguments(p, _config_type(config))
    p.add_argument("--config", help=config_help)
    _add_remote_args(p, remote)
    p.set_defaults(func=func, config_type=config)


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end like every other error: one line on stderr, exit 2 (`--help` shows usage)."""

    def error(self, message: str):
        self.exit(2, f"actstore: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    argv = sys.argv[1:] if argv is None else argv
    wanted = next((a for a in argv if not a.startswith("-")), None)
    parser = _Parser(
        prog="actstore",
        description="Store ViT activations once in Zarr, and read them back for SAE training.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

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

    _config_command(sub, wanted, "harvest", cmd_harvest, "activation_store.harvest.config:HarvestConfig",
                    "run an open_clip ViT over images and store its residual stream",
                    "Run an open_clip ViT once over URLs (via img2dataset), webdataset shards or an image folder, and "
                    "store the residual stream of the requested layers. Resumable: rerun the same command after a "
                    "crash. Split across processes with --rank/--world-size (or torchrun/SLURM variables).",
                    "TOML or YAML file with these settings (nested [model], [store], [download] tables, or all "
                    "under [harvest]); flags override it", remote="stores and shards")
    _config_command(sub, wanted, "train", cmd_train, "activation_store.sae.trainer:TrainerConfig",
                    "train a TopK SAE on one location of a store (resumable)",
                    "Train a TopK SAE on shuffled tokens of one location: OpenAI's recipe by default (AuxK, unit-norm "
                    "decoder, Adam with warm-up and decay), CLIP-Scope's with --arch clipscope (no ReLU, no encoder "
                    "bias, their initialisation, Adam at a constant 9e-5, no AuxK). Checkpoints every "
                    "--checkpoint-every tokens; rerunning the same command resumes from the newest checkpoint.",
                    "TOML or YAML file with TrainerConfig's fields (top level or a [train] table, with nested "
                    "[reader] and [sae] tables); flags override it")
    _config_command(sub, wanted, "eval", cmd_eval, "activation_store.sae.evaluate:EvalConfig",
                    "evaluate an SAE checkpoint on held-out images: metrics, plots, image grids, HTML",
                    "Evaluate a checkpoint written by `actstore train` on the images held out of training (split by "
                    "image), on the tokens it was trained on: CLIP-Scope's metrics (docs/metrics.md), a token-wise "
                    "MSE heatmap, training curves, top-9 image grids per latent, and OUT/report.html. Another SAE "
                    "(a CLIP-Scope .pt file, a SAELens folder, or a file of a Hugging Face repo: a name such as "
                    "22_resid/1200013184.pt is looked up in CLIP-Scope's repo, or in --repo-id) is evaluated on "
                    "every image of STORE at --location.",
                    "TOML or YAML file with EvalConfig's fields (top level or an [eval] table)")
    _config_command(sub, wanted, "export", cmd_export, "activation_store.sae.export:ExportConfig",
                    "write a trained SAE as a SAELens folder or a CLIP-Scope .pt file",
                    "Write the SAE of a run (its newest checkpoint) or checkpoint in SAELens's layout (cfg.json + "
                    "sae_weights.safetensors) or CLIP-Scope's (.pt), with the run's normaliser folded in so it takes "
                    "raw store activations, and the hook and model names (SAELens) or tokens, steps and dead-latent "
                    "counters (CLIP-Scope) taken from the run. An SAE the format cannot represent exactly is refused.",
                    "TOML or YAML file with ExportConfig's fields (top level or an [export] table)")

    _config_command(sub, wanted, "convert", cmd_convert, "activation_store.store.convert:ConvertConfig",
                    "re-encode a store in another storage dtype (fp8: one byte per value) or codec preset",
                    "Re-encode the committed input shards of SRC into a new store DST with another storage dtype "
                    "(fp16, bf16, fp32, or fp8: float8 e4m3 with a scale per token) and/or codec preset, keeping "
                    "every image's row, the image tables, and statistics of the stored values. Resumable: rerun "
                    "the same command after a crash (kill -9 included); converted shards are skipped.",
                    "TOML or YAML file with ConvertConfig's fields (top level or a [convert] table)")

    p = sub.add_parser("demo", help="the README's demo: bundled photos -> harvest -> store -> SAE -> eval report",
                       description="Harvest the bundled CC0 photos with ViT-L-14 (random weights when the "
                       "pretrained ones are not on this machine) into OUT/store.zarr, show info and verify, read "
                       "it back shuffled, train a small TopK SAE on the deepest layer and write its evaluation "
                       "report to OUT/eval/report.html.")
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--store-dtype", default="fp16", choices=("fp16", "bf16", "fp32", "fp8"),
                   help="the store the demo reads and trains on: the harvest's fp16, or its conversion (fp8: one "
                   "byte per value)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed)
        return int(exc.code or 0)
    try:
        return args.func(args)
    except ActivationStoreError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message's own layout
        print(f"actstore: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
