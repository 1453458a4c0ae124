"""`actstore harvest`: resolve the input shards, load the ViT, create or reopen the store, plan,
then run this rank's shards, skipping committed ones, and write a JSON report."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from activation_store._version import __version__
from activation_store.distributed import local_rank, rank_source, resolve_rank
from activation_store.errors import (
    ActivationStoreError,
    DistributedError,
    ShardClaimedError,
    ShardStateError,
    StoreFormatError,
    StoreMismatchError,
    StoreNotFoundError,
)
from activation_store.harvest.config import DownloadConfig, HarvestConfig
from activation_store.harvest.model import LoadedViT
from activation_store.harvest.pipeline import DecodePool, ShardRunner
from activation_store.harvest.sources import InputShard, folder_shards, webdataset_shards
from activation_store.store import ActivationStore, open_store
from activation_store.store.storage import Storage


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
    resize, asked = _download_resize(store.attrs.get("harvest_config") or {}), _download_resize(cfg.to_dict())
    if asked is not None and resize is not None and resize != asked:
        problems.append(f"download resizing: store was filled with img2dataset resize {resize}, this run asks for "
                        f"{asked} (other pixels: --download-resize-mode and --download-image-size as the store's)")
    if problems:
        raise StoreMismatchError(
            f"refusing to resume or append to {store.url}:\n  " + "\n  ".join(problems)
            + "\nRun with the store's own settings (`actstore info` shows them), or harvest into a new --out"
        )


def _download_resize(harvest_config: dict) -> tuple | None:
    """(resize mode, size) of a URL-list harvest's img2dataset downloads; None for other sources."""
    if not harvest_config.get("urls"):
        return None
    download = harvest_config.get("download") or {}
    defaults = DownloadConfig()
    return DownloadConfig.resize_of(download.get("resize_mode", defaults.resize_mode),
                                    download.get("image_size", defaults.image_size))


def open_or_create_store(cfg: HarvestConfig, model: LoadedViT, shards: list[InputShard], rank: int, world: int = 1,
                         mine: list[InputShard] | None = None) -> ActivationStore:
    """Rank 0 creates the store (or checks an existing one) and plans every input shard; other
    ranks wait until their shards (`mine`, default all) are planned. Planning is idempotent, so a
    rerun keeps every region."""
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
    return wait_for_plan(cfg, model, shards, shards if mine is None else mine, rank, world)


POLL_S = 0.5  # how often a waiting rank looks: a HEAD, or a LIST and a GET per planned shard, on object stores


def say(message: str) -> None:
    """A status line on stderr, printed above a tqdm bar rather than through it."""
    tqdm.write(f"actstore harvest: {message}", file=sys.stderr)
    sys.stderr.flush()


class _PlanWatch:
    """What a waiting rank sees of rank 0's work, read from storage afresh at each look: a
    listing or a "not found" cached by fsspec would hide a plan that exists (the store is
    probed with `Storage.exists`, which bypasses the listing cache, and shards are listed with
    `shards(refresh=True)`)."""

    def __init__(self, cfg: HarvestConfig, model: LoadedViT, shards: list[InputShard], mine: list[InputShard]) -> None:
        self.cfg, self.model, self.shards, self.mine = cfg, model, shards, mine
        self.probe = Storage(cfg.out, cfg.storage_options or None)  # one client for every probe
        self.store: ActivationStore | None = None
        self.missing = list(mine)
        self.planned = 0  # input shards the store has planned, ours or not
        self.foreign: str | None = None  # a planned input shard that is none of this rank's inputs

    def look(self) -> bool:
        """Whether every input shard of this rank is planned now."""
        if self.store is None:
            if not self.probe.exists("zarr.json"):  # no store yet, or its creation is under way
                return False
            try:
                self.store = open_store(self.cfg.out, self.cfg.storage_options or None)
            except StoreNotFoundError:
                return False
            _check_compatible(self.store, self.cfg, self.model)  # a mismatch is final: no need to wait for it
        _keep_planned_aliases(self.store, self.shards)  # lists the store's shards afresh
        planned = {s.source: s for s in self.store.shards()}
        ours = {s.name for s in self.shards}
        self.planned = len(planned)
        self.foreign = next((p for p in sorted(planned) if p not in ours), None)
        self.missing = [s for s in self.mine if s.name not in planned]
        for shard in self.mine:
            if shard.name in planned and shard.capacity > planned[shard.name].capacity:
                raise DistributedError(
                    f"input shard {shard.name!r} of {self.probe.url} was planned by rank 0 for "
                    f"{planned[shard.name].capacity} images, but this rank's has {shard.capacity}: the ranks' inputs "
                    f"differ; give every rank the same --images/--shards/--urls, --shard-size and paths")
        return not self.missing

    def waiting_for(self) -> str:
        if self.store is None:
            return f"there is no store at {self.probe.url} yet"
        return (f"{len(self.missing)} of this rank's {len(self.mine)} input shards are not planned in {self.probe.url} "
                f"yet (the first: {self.missing[0].name!r}; the store has {self.planned} planned)")

    def hint(self) -> str:
        """Why the plan may never come: the ranks were given different inputs."""
        if self.foreign is None:
            return ""
        return (f"; the store plans input shards this rank was not given (such as {self.foreign!r}): once rank 0 has "
                f"planned, that means the ranks' inputs differ; give every rank the same --images/--shards/--urls, "
                f"--shard-size and paths")


def wait_for_plan(cfg: HarvestConfig, model: LoadedViT, shards: list[InputShard], mine: list[InputShard], rank: int,
                  world: int) -> ActivationStore:
    """A rank > 0: wait, saying so on stderr at once and every `wait_report_s`, until rank 0 has
    created the store and planned this rank's input shards; DistributedError after `wait_for_plan_s`."""
    watch = _PlanWatch(cfg, model, shards, mine)
    start = time.monotonic()
    deadline, next_report, said = start + cfg.wait_for_plan_s, start, False
    damaged_before = False
    while True:
        looked = time.monotonic()
        try:
            if watch.look():
                break
            damaged_before = False
        except StoreFormatError:
            # a shard record caught between its listing and its write (local disks) reads as missing
            # once; a store that is damaged stays so, and is reported at the next look
            if damaged_before:
                raise
            damaged_before = True
        now = time.monotonic()
        if now >= deadline:
            raise DistributedError(
                f"rank {rank}: waited {cfg.wait_for_plan_s:.0f} s for rank 0, but {watch.waiting_for()}{watch.hint()}; "
                f"start rank 0 too (the same command with rank 0), or wait longer with --wait-for-plan-s")
        if now >= next_report:
            if said:
                say(f"rank {rank}: still waiting for rank 0 after {now - start:.0f} s ({deadline - now:.0f} s left): "
                    f"{watch.waiting_for()}{watch.hint()}")
            else:
                say(f"rank {rank} of {world} ({rank_source(cfg.rank, cfg.world_size)}): waiting up to "
                    f"{cfg.wait_for_plan_s:.0f} s for rank 0 to create and plan {watch.probe.url}: {watch.waiting_for()}")
            said, next_report = True, now + cfg.wait_report_s
        # a look reads every planned shard's record: with many, look less often (at most a fifth of the time)
        time.sleep(min(max(POLL_S, 4 * (now - looked)), deadline - now))
    if said:
        say(f"rank {rank}: {watch.probe.url} is planned (after {time.monotonic() - start:.0f} s of waiting); "
            f"harvesting this rank's input shards")
    return watch.store.refresh()  # arrays grown and shards planned since it was opened


def _keep_planned_aliases(store: ActivationStore, shards: list[InputShard]) -> None:
    """A shard the store planned under an alias (a tar's path as typed, before names were
    normalised) keeps that name, so resuming such a store does not harvest it again."""
    planned = {s.source for s in store.shards(refresh=True)}
    for shard in shards:
        if shard.name not in planned:
            shard.name = next((a for a in shard.aliases if a in planned), shard.name)


def _finish_for_another_rank(runner: ShardRunner, store: ActivationStore, shard: InputShard) -> dict | str:
    """Harvest an input shard of another rank (`--finish-other-ranks`): its result, or "committed"
    when it was committed since this rank listed it, or "held" when a live writer holds its claim
    (its own rank, still at work, or another rank finishing it). A dead writer's claim is taken
    over (see store/claims.py), so what a killed rank left is redone here."""
    info = store.shard(shard.name)
    if store.read_shard(info.index).committed:
        return "committed"
    try:
        return runner.run(shard)
    except ShardClaimedError:
        return "held"
    except ShardStateError:
        if store.read_shard(info.index).committed:  # committed between the look above and the claim
            return "committed"
        raise


def device_of_this_process(device: str) -> str:
    """`--device cuda` in one of several processes a launcher started on a machine: this process's
    own GPU, the LOCAL_RANK-th (SLURM_LOCALID-th) of those it sees, not GPU 0 for all of them. A
    launcher that binds one GPU to each process leaves it just that one."""
    local = local_rank()
    if device != "cuda" or local is None:
        return device
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"cuda:{local % count}" if count else device  # no GPU: torch_device says so


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
    model_cfg = dataclasses.replace(cfg.model, preprocess=preset) if preset else cfg.model
    model = LoadedViT(dataclasses.replace(model_cfg, device=device_of_this_process(model_cfg.device)), cfg.layers)
    mine = [s for i, s in enumerate(shards) if i % world == rank]
    store = open_or_create_store(cfg, model, shards, rank, world, mine)
    todo = [s for s in mine if not store.shard(s.name).committed]
    theirs = [s for i, s in enumerate(shards) if i % world != rank and not store.shard(s.name).committed] \
        if cfg.finish_other_ranks else []
    if downloader is not None:
        downloader.start([s.name for s in todo])
    h, w = model.preprocess["image_size"]
    pool = DecodePool(model.transform, cfg.workers, cfg.min_image_size, use_fork=model.device.type != "cuda",
                      pixel_shape=(h, w, 3))
    pool.warm_up()
    progress = tqdm(total=sum(s.capacity for s in todo + theirs), unit="img", desc=f"harvest rank {rank}",
                    disable=not cfg.progress, dynamic_ncols=True)
    runner = ShardRunner(model, store, cfg.batch_size, pool, progress, claim_timeout_s=cfg.claim_timeout_s,
                         cuda_graph=cfg.cuda_graph)
    runner.start_clock()
    results = []
    others = {"finished": 0, "committed_meanwhile": 0, "held_by_other_writers": []}
    t0 = time.perf_counter()
    try:
        for shard in todo:
            results.append(runner.run(shard))
        for shard in theirs:
            outcome = _finish_for_another_rank(runner, store, shard)
            if isinstance(outcome, dict):
                results.append(outcome)
                others["finished"] += 1
            elif outcome == "committed":
                others["committed_meanwhile"] += 1
            else:
                others["held_by_other_writers"].append(shard.name)
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
                         "harvested": len(results) - others["finished"]},
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
    if cfg.finish_other_ranks:
        report["other_ranks"] = others
        if others["held_by_other_writers"]:
            say(f"rank {rank}: {len(others['held_by_other_writers'])} input shard(s) of other ranks are being written by "
                f"other writers ({others['held_by_other_writers'][0]}, ...): left to them. A writer that died on another "
                f"machine holds its shard until its claim times out; rerun then, or rerun that rank on its machine")
    path = default_report_path(cfg, rank)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2))
    report["report_path"] = path
    return report
