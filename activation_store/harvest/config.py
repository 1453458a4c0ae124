"""The harvest's typed configuration (HarvestConfig, with the model's, the store's and the
downloader's nested), loadable from TOML or YAML and overridden by CLI flags derived from it."""

from __future__ import annotations

from dataclasses import dataclass

from activation_store.configs import option, redacted
from activation_store.errors import ConfigError
from activation_store.harvest.model import ModelConfig
from activation_store.store.config import StoreConfig
from activation_store.store.locations import parse_locations

DEFAULT_LAYERS = "2,5,8,11,14,17,20,22"


@dataclass
class DownloadConfig:
    """img2dataset settings for `--urls` sources."""

    work_dir: str | None = option(None, help="where img2dataset writes shards (default: beside the store)",
                                  flag="--download-dir")
    url_col: str = option("url", help="URL column of the list")
    caption_col: str | None = option("caption", help="caption column of the list")
    number_sample_per_shard: int = option(1000, help="URLs per input shard", flag="--urls-per-shard")
    processes_count: int = option(2, help="img2dataset processes", flag="--download-processes")
    thread_count: int = option(16, help="img2dataset threads per process", flag="--download-threads")
    timeout: int = option(10, help="seconds per download")
    retries: int = option(0, help="download retries")
    # keep originals: the model's preprocessing (its --preprocess preset) runs in the harvest
    resize_mode: str = option("no", help="img2dataset resize mode (no: keep the original bytes, the exact default; "
                              "keep_ratio: smaller shards and less decoding, at a parity cost measured by "
                              "benchmarks/download_resize_parity.py, see docs/harvest.md)")
    image_size: int = option(256, help="img2dataset's target size when --download-resize-mode is not 'no' "
                             "(keep_ratio: the shorter side)")
    allow_private_urls: bool = option(False, help="also download from loopback, private, link-local and other "
                                      "non-public addresses (hosts are resolved; by default such URLs are refused)")
    allow_file_urls: bool = option(False, help="also download file:// URLs (local files; by default refused)")

    @staticmethod
    def resize_of(resize_mode: str, image_size: int) -> tuple[str, int | None]:
        """What decides the pixels of downloaded shards: (mode, size), the size None without resizing."""
        return resize_mode, None if resize_mode == "no" else image_size

    def __post_init__(self) -> None:
        for name in ("number_sample_per_shard", "processes_count", "thread_count", "timeout", "image_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"download {name} must be >= 1, got {getattr(self, name)}")


def _layers(value) -> list[int]:
    return [loc.layer for loc in parse_locations(value)]


@dataclass
class HarvestConfig:
    out: str | None = option(None, help="the store (local path or s3://...); created, or resumed if it exists")
    urls: str | None = option(None, help="parquet or csv URL list (url and caption columns), downloaded with "
                              "img2dataset")
    shards: str | None = option(None, help="webdataset tars: a path, URL or brace pattern (data/{00000..00099}.tar)")
    images: str | None = option(None, help="a folder of images (searched recursively)")
    layers: list[int] = option(default_factory=lambda: _layers(DEFAULT_LAYERS), parse=_layers,
                               help="0-indexed blocks to store")
    model: ModelConfig = option(default_factory=ModelConfig, help="the ViT")
    store: StoreConfig = option(default_factory=StoreConfig, help="the store's layout", prefix="store-")
    download: DownloadConfig = option(default_factory=DownloadConfig, help="img2dataset", prefix="download-")
    batch_size: int = option(64, help="images per forward pass")
    workers: int = option(4, help="decode processes (0 decodes in this process)")
    shard_size: int = option(1000, help="folder entries (files) per input shard for --images")
    min_image_size: int = option(2, help="drop images smaller than this many pixels on a side")
    follow_external_symlinks: bool = option(False, help="--images: follow symbolic links that leave the folder "
                                            "(by default they are counted as outside_folder)")
    rank: int | None = option(None, help="this process's rank (default $RANK or $SLURM_PROCID or 0)")
    world_size: int | None = option(None, help="number of processes (default $WORLD_SIZE or $SLURM_NTASKS or 1)")
    storage_options: dict = option(default_factory=dict, help="fsspec options", cli=False)
    report: str | None = option(None, help="JSON report path ({rank} is replaced; default beside the store)")
    progress: bool = option(True, help="show a progress bar")
    wait_for_plan_s: float = option(600.0, help="ranks > 0 wait this long for rank 0 to create the store and plan "
                                    "their input shards, then stop with an error")
    finish_other_ranks: bool = option(False, help="after this rank's own input shards, also harvest those of other "
                                      "ranks that are not committed and that no live writer holds (what a dead rank "
                                      "left); --images and --shards only")
    wait_report_s: float = option(30.0, help="while waiting for the plan, say on stderr every this many seconds "
                                  "what is not planned yet")
    claim_timeout_s: float = option(3600.0, help="a shard's writer claim that was not renewed for this long is stale: "
                                    "another run may take the shard over (what a rank that died on another machine "
                                    "left). It is renewed at every batch, at most every tenth of this")
    cuda_graph: bool = option(False, help="CUDA only: capture the device work of a full batch (forward, hook copies, "
                              "statistics, fp8 quantisation) once as a CUDA graph and replay it, one launch a batch "
                              "instead of hundreds from Python; the same kernels on the same inputs")

    def __post_init__(self) -> None:
        self.layers = _layers(self.layers)
        given = [k for k in ("urls", "shards", "images") if getattr(self, k)]
        if len(given) != 1:
            raise ConfigError("give exactly one source: --urls FILE, --shards PATTERN or --images DIR")
        if not self.out:
            raise ConfigError("--out STORE is required")
        if self.batch_size < 1 or self.workers < 0 or self.shard_size < 1:
            raise ConfigError("batch size and shard size must be >= 1, workers >= 0")
        if self.finish_other_ranks and self.urls:
            raise ConfigError("--finish-other-ranks takes --images or --shards: with --urls each rank downloads only its "
                              "own input shards, so rerun the rank that died (the same command and rank)")
        if self.cuda_graph and not self.model.device.startswith("cuda"):
            raise ConfigError(f"--cuda-graph needs a CUDA device, the model is on {self.model.device!r}: add "
                              f"--device cuda, or drop --cuda-graph")
        if not self.claim_timeout_s > 0:
            raise ConfigError(f"--claim-timeout-s must be > 0, got {self.claim_timeout_s}")
        if not self.wait_for_plan_s >= 0 or not self.wait_report_s > 0:
            raise ConfigError(f"--wait-for-plan-s must be >= 0 and --wait-report-s > 0, got {self.wait_for_plan_s} "
                              f"and {self.wait_report_s}")

    @property
    def locations(self) -> list[str]:
        return [f"resid_{layer}" for layer in sorted(set(self.layers))]

    def to_dict(self) -> dict:
        """For the store's `harvest_config` attribute: storage options may hold credentials, so only
        their names are kept."""
        return redacted(self)
