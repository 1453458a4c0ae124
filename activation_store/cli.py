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


def _add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="store path or URL (a local directory, or s3://bucket/prefix)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// stores (e.g. http://127.0.0.1:9000)")
    p.add_argument(
        "--storage-options",
        metavar="JSON",
        help='fsspec options for remote stores, e.g. \'{"key": "...", "secret": "..."}\'',
    )


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


def cmd_demo(args) -> int:
    from activation_store.demo import run_demo

    return run_demo(args.out)


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

    p = sub.add_parser("demo", help="the README's demo: build a small store and show info and verify",
                       description="Run the built-in demo into OUT.")
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
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
