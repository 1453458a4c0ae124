"""The store's typed configuration."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from activation_store.configs import option
from activation_store.errors import ConfigError
from activation_store.store.encoding import DTYPES, PRESETS, CodecSpec, canonical_dtype

DEFAULT_CHUNK_IMAGES = 16  # 16 x 257 tokens = 4,112 rows, 8.4 MB in fp16 at d=1024: see docs/benchmarks.md
DEFAULT_REGION_IMAGES = 1024
DEFAULT_CODEC = "none"


@dataclass
class StoreConfig:
    """How activations are laid out and encoded.

    chunk_images: images per chunk of the main arrays (chunks never split an image).
    region_images: granularity of input-shard regions, and images per chunk of the CLS arrays;
        a multiple of chunk_images, so no chunk of either array is shared by two input shards.
    """

    dtype: str = option("fp16", help="storage dtype (fp8: one byte per value, float8 e4m3 with a float32 scale "
                        "per token; format 2.0, docs/format.md)", choices=DTYPES)
    codec: str = option(DEFAULT_CODEC, help="codec preset", choices=PRESETS, flag="--codec")
    zstd_level: int = option(1, help="zstd level of the compressed presets")
    keepbits: int | None = option(None, help="mantissa bits kept by the bitround preset (default: fp16 7, bf16 5, "
                                  "fp32 10)")
    chunk_images: int = option(DEFAULT_CHUNK_IMAGES, help="images per chunk", flag="--chunk-images")
    region_images: int = option(DEFAULT_REGION_IMAGES, help="shard region alignment and CLS chunk size",
                                flag="--region-images")

    def __post_init__(self) -> None:
        self.dtype = canonical_dtype(self.dtype)
        if self.codec.startswith("bitround") and self.keepbits is None:
            self.keepbits = {"fp16": 7, "bf16": 5, "fp32": 10}.get(self.dtype)  # fp8: refused by codec_spec()
        if self.chunk_images < 1:
            raise ConfigError(f"chunk_images must be >= 1, got {self.chunk_images}")
        if self.region_images < self.chunk_images or self.region_images % self.chunk_images:
            raise ConfigError(
                f"region_images ({self.region_images}) must be a positive multiple of chunk_images "
                f"({self.chunk_images})"
            )
        self.codec_spec()  # validates preset and keepbits

    def codec_spec(self) -> CodecSpec:
        return CodecSpec(self.codec, self.dtype, self.zstd_level, self.keepbits)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_attrs(cls, d: dict) -> StoreConfig:
        """The configuration a store's root attributes record. Keys this version does not know are
        ignored: `extra` (written by earlier versions, never read) and any a later 1.x adds."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
