"""`actstore harvest`: resolve the input shards, load the ViT, create or reopen the store, plan,
then run this rank's shards, skipping committed ones, and write a JSON report."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from tqdm import tqdm

from activation_store._version import __version__
from activation_store.distributed import resolve_rank
from activation_store.errors import ActivationStoreError, DistributedError, StoreMismatchError, StoreNotFoundError
from activation_store.harvest.config import HarvestConfig
from activation_store.harvest.model import LoadedViT
from activation_store.harvest.pipeline import DecodePool, ShardRunner
from activation_store.harvest.sources import InputShard, folder_shards, webdataset_shards
from activation_store.store import ActivationStore, open_store


def resolve_sources(cfg: HarvestConfig, rank: int, world: int) -> tuple[list[InputShard], object | None]:
    """All input shards in a fixed order (every rank sees the same list), and the downloader of a
    URL source, if any."""
    if cfg.images:
        return folder_shards(cfg.images, cfg.shard_size, cfg.follow_external_symlinks), None
    if cfg.shards:
        return webdataset_shards(cfg.shards, cfg.storage_options or None), None
    from activation_store.harvest.urls import UrlDownloader

    downloader = UrlDownloader(cfg.urls, cfg.download, cfg.out, rank, world)
    return downloader.shards(), downloader


def recorded_preset(cfg: HarvestConfig) -> str | None:
    """With `--preprocess auto`, the preset an existing store was made with (stores made before
    presets existed: open_clip), so that resuming it keeps it; None for a new store or a named preset."""
    if cfg.model.preprocess != "auto":
        return None
    try:
        have = open_store(cfg.out, cfg.storage_options or None).attrs.get("model") or {}
    except ActivationStoreError:  # no store yet (or none we can read: opening it again below says why)
        return None
    return have.get("preprocess", "open_clip") if have else None


def _check_compatible(store: ActivationStore, cfg: HarvestConfig, model: LoadedViT) -> None:
    have = store.attrs.get("model", {})
    problems = []
    if store.locations != cfg.locations:
        problems.append(f"locations: store has {store.locations}, this run asks for {cfg.locations}")
    have_preset = have.get("preprocess", "open_clip") if have else None
    if have_preset is not None and have_preset != model.preset:
        problems.append(f"preprocessing preset: store has {have_preset}, this run asks for {model.preset} "
                        f"(--preprocess {have_preset}, or auto, resumes it)")
    if have.get("fingerprint") != model.fingerprint:
        problems.append(
            f"model: store was made with {have.get('name')} / {have.get('pretrained')} (fingerprint "
            f"{str(have.get('fingerprint'))[:12]}), this run loads {model.model_name} / {model.cfg.pretrained} "
            f"(fingerprint {model.fingerprint[:12]}): different weights or preprocessing"
        )
    if store.n_tokens != model.n_tokens or store.d_model != model.width:
        problems.append(f"shape: store holds {store.n_tokens} x {store.d_model}, the model gives {model.n_tokens} x {model.width}")
    if problems:
        raise StoreMismatchError(
            f"refusing to resume or append to {store.url}:\n  " + "\n  ".join(problems)
            + "\nRun with the store's own settings (`actstore info` shows them), or harvest into a new --out"
        )


def open_or_create_store(cfg: HarvestConfig, model: LoadedViT, shards: list[InputShard], rank: int) -> ActivationStore:
    """Rank 0 creates the store (or checks an existing one) and plans every input shard; other
    ranks wait until their shards are planned. Planning is idempotent, so a rerun keeps every region."""
    if rank == 0:
        try:
            store = open_store(cfg.out, cfg.storage_options or None)
        except StoreNotFoundError:
            store = ActivationStore.create(
                cfg.out, locations=cfg.locations, n_tokens=model.n_tokens, d_model=model.width, config=cfg.store,
                model=model.describe(), harvest_config=cfg.to_dict(), storage_options=cfg.storage_options or None,
            )
        _check_compatible(store, cfg, model)
        _keep_planned_aliases(store, shards)
        store.plan_shards([(s.name, s.capacity) for s in shards])
        return store
    deadline = time.monotonic() + cfg.wait_for_plan_s
    while True:
        try:
            store = open_store(cfg.out, cfg.storage_options or None)
            _keep_planned_aliases(store, shards)
            names = {s.name for s in shards}
            if names <= {s.source for s in store.shards(refresh=True)}:
                _check_compatible(store, cfg, model)
                return store
        except StoreNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise DistributedError(
                f"rank {rank}: rank 0 has not created and planned {cfg.out} within {cfg.wait_for_plan_s:.0f} s; "
                f"start rank 0 too, with the same inputs"
            )
        time.sleep(0.5)


def _keep_planned_aliases(store: ActivationStore, shards: list[InputShard]) -> None:
    """A shard the store planned under an alias (a tar's path as typed, before names were
    normalised) keeps that name, so resuming such a store does not harvest it again."""
    planned = {s.source for s in store.shards(refresh=True)}
    for shard in shards:
        if shard.name not in planned:
            shard.name = next((a for a in shard.aliases if a in planned), shard.name)


def default_report_path(cfg: HarvestConfig, rank: int) -> str:
    if cfg.report:
        return cfg.report.replace("{rank}", str(rank))
    base = cfg.out.rstrip("/") if "://" not in cfg.out else os.path.basename(cfg.out.rstrip("/"))
    return f"{base}.harvest-report.rank{rank}.json"


def harvest(cfg: HarvestConfig) -> dict:
    rank, world = resolve_rank(cfg.rank, cfg.world_size, launcher_env=True)
    t_start = time.perf_counter()
    shards, downloader = resolve_sources(cfg, rank, world)
    preset = recorded_preset(cfg)
    model = LoadedViT(dataclasses.replace(cfg.model, preprocess=preset) if preset else cfg.model, cfg.layers)
    store = open_or_create_store(cfg, model, shards, rank)
    mine = [s for i, s in enumerate(shards) if i % world == rank]
    todo = [s for s in mine if not store.shard(s.name).committed]
    if downloader is not None:
        downloader.start([s.name for s in todo])
    pool = DecodePool(model.transform, cfg.workers, cfg.min_image_size, use_fork=model.device.type != "cuda")
    pool.warm_up()
    progress = tqdm(total=sum(s.capacity for s in todo), unit="img", desc=f"harvest rank {rank}", disable=not cfg.progress,
                    dynamic_ncols=True)
    runner = ShardRunner(model, store, cfg.batch_size, pool, progress)
    runner.start_clock()
    results = []
    t0 = time.perf_counter()
    try:
        for shard in todo:
            results.append(runner.run(shard))
    finally:
        pool.close()
        progress.close()
        if downloader is not None:
            downloader.stop()
    elapsed = time.perf_counter() - t0
    stored = sum(r["stored"] for r in results)
    by_status: dict[str, int] = {}
    for r in results:
        for k, v in r["by_status"].items():
            by_status[k] = by_status.get(k, 0) + v
    conversions = {k: v for k, v in runner.counts.items() if k.startswith("converted_from_")}
    report = {
        "store": store.url,
        "software_version": __version__,
        "rank": rank,
        "world_size": world,
        "model": model.describe(),
        "random_weights": model.random_weights,
        "locations": store.locations,
        "input_shards": {"total": len(shards), "this_rank": len(mine), "skipped_committed": len(mine) - len(todo),
                         "harvested": len(results)},
        "images": {"stored": stored, "seen": sum(by_status.values()), "by_status": by_status,
                   "converted_to_rgb": conversions},
        "bytes_written": runner.bytes_written,
        "seconds": {"harvest": elapsed, "total": time.perf_counter() - t_start, **runner.stage_seconds},
        "images_per_s": stored / elapsed if elapsed > 0 else None,
        "steady_images_per_s": runner.steady_images_per_s,
        "shards": results,
    }
    if downloader is not None:
        report["download"] = downloader.report()
    path = default_report_path(cfg, rank)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2))
    report["report_path"] = path
    return report
