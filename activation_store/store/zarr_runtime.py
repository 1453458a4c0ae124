"""Process-wide zarr settings: the `zarrs` codec pipeline where installed (it decoded our chunks
about twice as fast as zarr's default pipeline, see docs/benchmarks.md) and a thread count equal to
the cores we may use."""

from __future__ import annotations

import os

import zarr

_configured = False


def configure(pipeline: str | None = None) -> str:
    """Select the codec pipeline: 'zarrs', 'default', or None for $ACTSTORE_CODEC_PIPELINE or zarrs."""
    global _configured
    choice = pipeline or os.environ.get("ACTSTORE_CODEC_PIPELINE", "zarrs")
    settings = {"threading.max_workers": len(os.sched_getaffinity(0))}
    if choice == "zarrs":
        try:
            import zarrs  # noqa: F401

            settings["codec_pipeline.path"] = "zarrs.ZarrsCodecPipeline"
        except ImportError:
            choice = "default"
    if choice == "default":
        settings["codec_pipeline.path"] = "zarr.core.codec_pipeline.BatchedCodecPipeline"
    zarr.config.set(settings)
    _configured = True
    return choice


def ensure_configured() -> None:
    if not _configured:
        configure()
