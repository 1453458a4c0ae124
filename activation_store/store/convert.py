"""`actstore convert SRC DST --store-dtype fp8`: re-encode a store, input shard by input shard, into
another storage dtype (fp16, bf16, fp32, fp8) and/or codec preset.

DST gets SRC's locations, model record, chunking and regions: every committed shard of SRC is planned
in DST under its own source name with its own capacity, in SRC's order, so each image keeps its row
(the train/eval split, which hashes rows, holds out the same images in both). Each shard is then
written by an ordinary ShardWriter (claim, chunks, statistics of the stored values, image table,
commit), so a convert killed at any point (kill -9 included) is resumed by running it again: the
creation finishes, the planning is idempotent, committed shards are skipped and the shard that was
being written is redone from scratch by its next writer, giving the same bytes.

Values: an fp8 -> fp8 conversion (another codec) copies codes and scales, and the source's measured
error; every other one decodes SRC to float32 and encodes that, the writer measuring its own error
(a lossy preset's or fp8's `lossy_error`) against the values it was given, SRC's stored values.
Kill point for crash tests: `convert_batch` (after a batch is handed to the writer; see faults.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from activation_store.configs import option
from activation_store.errors import ConfigError
from activation_store.faults import kill_point
from activation_store.store.activation_store import ActivationStore, ShardInfo
from activation_store.store.config import StoreConfig
from activation_store.store.encoding import DTYPES, PRESETS
from activation_store.store.images import STRING_COLUMNS, ImageRecord, decode_text
from activation_store.store.writer import Quantized

BATCH_VALUES = 1 << 25  # values read and handed to the writer at a time, per location (128 MB as float32)


@dataclass
class ConvertConfig:
    src: str | None = option(None, positional=True, help="the store to convert (path or s3:// URL)")
    dst: str | None = option(None, positional=True, help="where the converted store goes: a new path, or an "
                             "interrupted conversion's, which it finishes")
    store_dtype: str | None = option(None, choices=DTYPES, help="storage dtype of DST (default: SRC's)")
    codec: str | None = option(None, choices=PRESETS, help="codec preset of DST (default: SRC's)")
    zstd_level: int | None = option(None, help="zstd level of DST's compressed presets (default: SRC's)")
    keepbits: int | None = option(None, help="mantissa bits of the bitround preset (default: per dtype)")
    progress: bool = option(True, help="show a progress bar")
    storage_options: dict | None = option(None, help="fsspec options of remote stores", cli=False)

    def check_complete(self) -> None:
        if not self.src or not self.dst:
            raise ConfigError("convert needs SRC and DST (actstore convert SRC DST --store-dtype fp8)")
        if self.src.rstrip("/") == self.dst.rstrip("/"):
            raise ConfigError(f"convert writes a new store: DST must differ from SRC ({self.src})")

    def store_config(self, src: ActivationStore) -> StoreConfig:
        """DST's StoreConfig: SRC's, with the dtype and codec settings given."""
        base = src.config
        dtype = self.store_dtype or base.dtype
        codec = self.codec or base.codec
        keepbits = self.keepbits
        if keepbits is None and codec == base.codec and dtype == base.dtype:
            keepbits = base.keepbits
        return StoreConfig(dtype=dtype, codec=codec, zstd_level=self.zstd_level or base.zstd_level, keepbits=keepbits,
                           chunk_images=base.chunk_images, region_images=base.region_images)


def _records(src: ActivationStore, shard: ShardInfo) -> tuple[list[ImageRecord], list[bool]]:
    """The shard's image records in table order (stored ones in row order), and which are stored."""
    table = src._shard_images(shard).to_pylist()  # checked against the commit's checksum
    stored = [r for r in table if r["row"] >= 0]
    if [r["row"] for r in stored] != list(range(shard.row_start, shard.row_start + len(stored))):
        table.sort(key=lambda r: (r["row"] < 0, r["row"]))  # the writer assigns rows in the order given
    out, ok = [], []
    for r in table:
        if r.pop("percent_encoded"):
            for c in STRING_COLUMNS:
                if r[c] is not None:
                    r[c] = decode_text(r[c])
        ok.append(r.pop("row") >= 0)
        out.append(ImageRecord(**r))
    return out, ok


def _open_or_create(cfg: ConvertConfig, src: ActivationStore, want: StoreConfig) -> ActivationStore:
    from activation_store.store.storage import Storage

    storage = Storage(cfg.dst, cfg.storage_options)
    if storage.exists("zarr.json"):
        dst = ActivationStore.open(cfg.dst, cfg.storage_options)
        got = (dst.locations, dst.n_tokens, dst.d_model, dst.config.to_dict())
        if got != (src.locations, src.n_tokens, src.d_model, want.to_dict()):
            raise ConfigError(
                f"{dst.url} is a store of {dst.config.to_dict()} with locations {dst.locations}, not the conversion "
                f"of {src.url} asked for ({want.to_dict()}); convert into a new path"
            )
        return dst
    return ActivationStore.create(cfg.dst, locations=src.locations, n_tokens=src.n_tokens, d_model=src.d_model,
                                  config=want, model=src.attrs.get("model") or {},
                                  harvest_config=src.attrs.get("harvest_config") or {},
                                  storage_options=cfg.storage_options)


def convert(cfg: ConvertConfig) -> dict:
    """Convert cfg.src into cfg.dst (see the module docstring); returns a summary."""
    cfg.check_complete()
    src = ActivationStore.open(cfg.src, cfg.storage_options)
    want = cfg.store_config(src)
    shards = src.committed_shards()
    if not shards:
        raise ConfigError(f"{src.url} has no committed shard to convert")
    dst = _open_or_create(cfg, src, want)
    planned = dst.plan_shards([(s.source, s.capacity) for s in shards])
    for s, d in zip(shards, planned):
        if d.row_start != s.row_start:
            raise ConfigError(f"{dst.url}: shard {s.source!r} lies at row {d.row_start}, at {s.row_start} in {src.url}: "
                              f"DST holds other shards; convert into a new path")
    done = {s.source for s in dst.committed_shards()}
    todo = [(s, d) for s, d in zip(shards, planned) if s.source not in done]
    copy_codes = src.quantized and dst.quantized
    bar = tqdm(total=sum(s.n_rows for s, _ in todo), desc="convert", unit="img", disable=not cfg.progress)
    try:
        for s, d in todo:
            _convert_shard(src, dst, s, d, copy_codes, bar)
    finally:
        bar.close()
    dst.refresh()
    return {"src": src.url, "dst": dst.url, "dtype": dst.dtype, "codec": dst.codec.preset,
            "shards": len(shards), "converted": len(todo), "skipped_committed": len(shards) - len(todo),
            "images": dst.n_images, "uncommitted_in_src": len(src.shards()) - len(shards)}


def _convert_shard(src: ActivationStore, dst: ActivationStore, s: ShardInfo, d: ShardInfo, copy_codes: bool,
                   bar) -> None:
    records, stored = _records(src, s)
    kept = [r for r, ok in zip(records, stored) if ok]
    per = max(src.chunk_images, BATCH_VALUES // (src.n_tokens * src.d_model) // src.chunk_images * src.chunk_images)
    with dst.writer(d.index) as w:
        for a in range(0, s.n_rows, per):
            b = min(a + per, s.n_rows)
            rows = (s.row_start + a, s.row_start + b)
            if copy_codes:
                batch = {loc: Quantized(src.read_rows(loc, *rows, raw=True), src.read_scales(loc, *rows))
                         for loc in src.locations}
            else:
                batch = {loc: _values(src, dst, loc, rows) for loc in src.locations}
            w.add(batch, kept[a:b])
            kill_point("convert_batch")
            bar.update(b - a)
        if copy_codes and s.commit.get("lossy_error") and s.commit.get("lossy_error_complete", True):
            w.add_lossy_error(s.commit["lossy_error"])  # the codes are SRC's: so is their error
        w.add_dropped([r for r, ok in zip(records, stored) if not ok])


def _values(src: ActivationStore, dst: ActivationStore, loc: str, rows: tuple[int, int]) -> np.ndarray:
    """Rows of a location as DST's writer takes them: as stored when that is exact (the same dtype,
    whose writer then stores the same bits; fp16 and fp32, which every writer reads as floats),
    else decoded to float32 (bf16's uint16 bit patterns, fp8's codes)."""
    if src.dtype == dst.dtype or src.dtype in ("fp16", "fp32"):
        return src.read_rows(loc, *rows, raw=True)
    return src.read_rows(loc, *rows)
