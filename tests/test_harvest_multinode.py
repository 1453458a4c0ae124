"""Ranks on several machines harvesting into one store on object storage: processes stand in for
the nodes, against the loopback S3 server, launched as `torchrun --nnodes` and `srun` launch them
(by their environment variables). Rank 0 creates and plans; a rank started before it says that
it waits, and for what, and goes on as soon as the plan exists; a rank killed midway leaves its
shards to a rerun of the same rank, and every image ends up committed exactly once."""

import os
import queue
import re
import subprocess
import sys
import threading
import uuid
from collections import Counter

import pytest

from activation_store.cli import main
from activation_store.distributed import local_rank, rank_source, resolve_rank
from activation_store.errors import ConfigError, DistributedError
from activation_store.harvest.run import device_of_this_process, harvest
from activation_store.store import open_store
from activation_store.store.storage import Storage
from harvest_helpers import TINY, cfg_for, make_images

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "SLURM_PROCID", "SLURM_NTASKS",
               "SLURM_NPROCS", "SLURM_LOCALID", "SLURM_NODEID", "ACTSTORE_KILL_AT")
N_IMAGES, SHARD_SIZE = 12, 3  # 4 input shards: rank 0 harvests s000000 and s000002, rank 1 the others
PATIENCE_S = 240  # only against a hang: no assertion depends on how long anything takes


def torchrun_env(rank: int, world: int, per_node: int = 1) -> dict:
    """What `torchrun --nnodes=world/per_node --nproc-per-node=per_node` sets for global rank `rank`."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank % per_node),
            "LOCAL_WORLD_SIZE": str(per_node), "GROUP_RANK": str(rank // per_node)}


def srun_env(rank: int, world: int, per_node: int = 1) -> dict:
    """What `srun --nodes=world/per_node --ntasks-per-node=per_node` sets for task `rank`."""
    return {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world), "SLURM_LOCALID": str(rank % per_node),
            "SLURM_NODEID": str(rank // per_node)}


@pytest.fixture
def clean_launch_env(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)


class Rank:
    """One harvest process; a thread reads its stderr line by line, so the test can wait for a line
    without blocking on a process that prints nothing."""

    def __init__(self, cmd: list[str], env: dict) -> None:
        base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
        self.proc = subprocess.Popen(cmd, env={**base, **env}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.err: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.err.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def stderr(self) -> str:
        return "".join(self.err)

    def wait_for_line(self, pattern: str) -> str:
        """The next stderr line matching `pattern`; a failure if the process ends first."""
        while True:
            try:
                line = self.lines.get(timeout=PATIENCE_S)
            except queue.Empty:
                pytest.fail(f"no stderr line matching {pattern!r}; stderr so far:\n{self.stderr()[-3000:]}")
            if line is None:
                pytest.fail(f"the process ended (rc {self.proc.wait()}) without a stderr line matching {pattern!r}:\n"
                            f"{self.stderr()[-3000:]}")
            if re.search(pattern, line):
                return line

    def finish(self) -> int:
        rc = self.proc.wait(timeout=PATIENCE_S)
        self._reader.join(timeout=PATIENCE_S)
        return rc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join()


@pytest.fixture
def ranks():
    started: list[Rank] = []

    def start(cmd, env) -> Rank:
        started.append(Rank(cmd, env))
        return started[-1]

    try:
        yield start
    finally:
        for r in started:
            r.stop()


def harvest_args(s3: str, url: str, folder, reports, *extra) -> list[str]:
    return ["harvest", "--images", str(folder), "--out", url, "--endpoint-url", s3, "--model", TINY, "--pretrained", "none",
            "--layers", "1,3", "--batch-size", "2", "--workers", "0", "--chunk-images", "4", "--region-images", "8",
            "--shard-size", str(SHARD_SIZE), "--no-progress", "--report", str(reports) + ".rank{rank}.json",
            "--wait-for-plan-s", str(PATIENCE_S), *extra]


def harvest_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "activation_store.cli", *harvest_args(*args)]


def reports_of(reports, rank: int) -> dict:
    import json

    with open(f"{reports}.rank{rank}.json") as f:
        return json.load(f)


def assert_complete(url: str, s3: str, names: list[str]) -> None:
    """Every input shard committed, every image committed exactly once, and verify finds nothing."""
    store = open_store(url, {"endpoint_url": s3})
    assert [s.state for s in store.shards()] == ["committed"] * (N_IMAGES // SHARD_SIZE)
    keys = Counter(os.path.basename(k) for k in store.images(include_dropped=True).column("key").to_pylist())
    assert keys == Counter(names), keys
    assert store.n_images == N_IMAGES
    assert main(["verify", url, "--endpoint-url", s3, "--quiet"]) == 0


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "imgs"
    return folder, make_images(folder, N_IMAGES)


def test_a_rank_started_before_rank_0_says_it_waits_and_goes_on_once_planned(s3, tmp_path, inputs, ranks, capsys):
    """torchrun --nnodes=2 --nproc-per-node=1: rank 1 starts first; it says, at once and then again,
    that it waits for rank 0 and for what (no store yet at this URL); only then does rank 0 start.
    Rank 1 sees the plan, harvests its half, and the store is whole."""
    folder, names = inputs
    url, reports = f"s3://acts/{uuid.uuid4().hex[:8]}.zarr", tmp_path / "rep"
    one = ranks(harvest_cmd(s3, url, folder, reports, "--wait-report-s", "0.5"), torchrun_env(1, 2))
    first = one.wait_for_line(r"waiting")
    assert re.search(rf"rank 1 of 2 \(torchrun's RANK/WORLD_SIZE\): waiting up to {PATIENCE_S} s for rank 0 to create "
                     rf"and plan {re.escape(url)}: there is no store at {re.escape(url)} yet", first), first
    again = one.wait_for_line(r"still waiting")  # periodically, while rank 0 has not even started
    assert f"there is no store at {url} yet" in again, again
    zero = ranks(harvest_cmd(s3, url, folder, reports), torchrun_env(0, 2))
    assert zero.finish() == 0, zero.stderr()[-3000:]
    assert one.finish() == 0, one.stderr()[-3000:]
    assert re.search(rf"rank 1: {re.escape(url)} is planned", one.stderr()), one.stderr()[-3000:]
    assert "waiting" not in zero.stderr()  # rank 0 plans; it waits for nobody
    for rank in (0, 1):
        got = reports_of(reports, rank)
        assert (got["rank"], got["world_size"]) == (rank, 2)
        assert got["input_shards"] == {"total": 4, "this_rank": 2, "skipped_committed": 0, "harvested": 2}
    capsys.readouterr()
    assert_complete(url, s3, names)


def test_a_rank_killed_midway_leaves_its_shards_to_a_rerun_of_it(s3, tmp_path, inputs, ranks, clean_launch_env,
                                                                 monkeypatch, capsys):
    """srun --nodes=2 --ntasks-per-node=1: rank 1 is killed (SIGKILL) after its third batch, with its
    first shard committed and its second half written; rank 0 finishes its own. The rerun of rank 1
    with the same srun variables takes over the dead writer's shard, skips the committed one, and
    the store holds every image exactly once."""
    folder, names = inputs
    url, reports = f"s3://acts/{uuid.uuid4().hex[:8]}.zarr", tmp_path / "rep"
    one = ranks(harvest_cmd(s3, url, folder, reports), {**srun_env(1, 2), "ACTSTORE_KILL_AT": "harvest_batch:3"})
    zero = ranks(harvest_cmd(s3, url, folder, reports), srun_env(0, 2))
    assert one.finish() == -9, one.stderr()[-3000:]
    assert zero.finish() == 0, zero.stderr()[-3000:]
    partial = open_store(url, {"endpoint_url": s3})
    assert [s.state for s in partial.shards()] == ["committed", "committed", "committed", "writing"]
    assert partial.n_images == N_IMAGES - SHARD_SIZE  # the killed rank's half-written shard is not visible

    # the rerun of rank 1 (in this process, which saves a start of the interpreter and the model)
    for var, value in srun_env(1, 2).items():
        monkeypatch.setenv(var, value)
    assert main(harvest_args(s3, url, folder, reports)) == 0
    got = reports_of(reports, 1)
    assert got["input_shards"] == {"total": 4, "this_rank": 2, "skipped_committed": 1, "harvested": 1}
    capsys.readouterr()
    assert_complete(url, s3, names)


def test_a_rank_whose_rank_0_never_comes_stops_with_a_clear_error(tmp_path, inputs, clean_launch_env, capsys):
    folder, _ = inputs
    out = tmp_path / "never"
    cfg = cfg_for(out, images=str(folder), shard_size=SHARD_SIZE, rank=1, world_size=2, wait_for_plan_s=0.2)
    never = re.escape(str(out))
    with pytest.raises(DistributedError, match=rf"rank 1: waited 0 s for rank 0, but there is no store at {never} yet; "
                                               r"start rank 0 too"):
        harvest(cfg)
    assert re.search(r"rank 1 of 2 \(--rank/--world-size\): waiting up to 0 s for rank 0", capsys.readouterr().err)


def test_a_rank_given_other_inputs_than_rank_0_is_told_so(tmp_path, inputs, clean_launch_env):
    """A node that sees the images at another path (so other input shard names) waits for shards rank 0
    never plans, and its error says the inputs differ; one with another --shard-size is refused at once."""
    folder, _ = inputs
    out = tmp_path / "s"
    harvest(cfg_for(out, images=str(folder), shard_size=SHARD_SIZE, rank=0, world_size=2))
    elsewhere = tmp_path / "mounted-elsewhere"
    make_images(elsewhere, N_IMAGES)
    cfg = cfg_for(out, images=str(elsewhere), shard_size=SHARD_SIZE, rank=1, world_size=2, wait_for_plan_s=0.2)
    with pytest.raises(DistributedError, match=r"2 of this rank's 2 input shards are not planned .* the store has 4 "
                                               r"planned\); the store plans input shards this rank was not given .* "
                                               r"the ranks' inputs differ"):
        harvest(cfg)
    cfg = cfg_for(out, images=str(folder), shard_size=4, rank=1, world_size=2, wait_for_plan_s=PATIENCE_S)
    with pytest.raises(DistributedError, match=r"was planned by rank 0 for 3 images, but this rank's has 4: the ranks' "
                                               r"inputs differ"):
        harvest(cfg)
    assert open_store(str(out)).n_images == N_IMAGES // 2  # nothing of the refused rank was written


def test_an_idle_rank_finishes_the_shards_another_rank_left(tmp_path, inputs, clean_launch_env, capsys):
    """--finish-other-ranks: rank 0, done with its own shards, harvests rank 1's (rank 1 never
    came), except one a live writer holds; once that writer is gone, a rerun finishes it too."""
    folder, names = inputs
    out = tmp_path / "s"
    cfg = cfg_for(out, images=str(folder), shard_size=SHARD_SIZE, rank=0, world_size=2)
    harvest(cfg)
    store = open_store(str(out))
    writer = store.writer(store.shards()[3].source)  # a live writer of rank 1's second shard
    try:
        cfg.finish_other_ranks = True
        got = harvest(cfg)
    finally:
        writer.close()
    assert got["input_shards"] == {"total": 4, "this_rank": 2, "skipped_committed": 2, "harvested": 0}
    held = [store.shards()[3].source]
    assert got["other_ranks"] == {"finished": 1, "committed_meanwhile": 0, "held_by_other_writers": held}
    assert "being written by other writers" in capsys.readouterr().err
    again = harvest(cfg)
    assert again["other_ranks"] == {"finished": 1, "committed_meanwhile": 0, "held_by_other_writers": []}
    done = open_store(str(out))
    assert [s.state for s in done.shards()] == ["committed"] * 4
    assert Counter(os.path.basename(k) for k in done.images().column("key").to_pylist()) == Counter(names)
    with pytest.raises(ConfigError, match="--finish-other-ranks takes --images or --shards"):
        cfg_for(out, urls=str(tmp_path / "list.parquet"), finish_other_ranks=True)


def test_a_waiting_rank_sees_an_object_written_after_it_listed_the_folder(s3):
    """fsspec caches listings: a store probed after its folder was listed must still be seen once
    another process writes it (the cause of a waiting rank that never saw rank 0's store)."""
    import boto3

    storage = Storage("s3://acts/probe.zarr", {"endpoint_url": s3})
    client = boto3.client("s3", endpoint_url=s3)
    client.put_object(Bucket="acts", Key="probe.zarr/.activation_store_creating", Body=b"{}")
    assert storage.list_dir("") == [".activation_store_creating"]
    assert not storage.exists("zarr.json")
    client.put_object(Bucket="acts", Key="probe.zarr/zarr.json", Body=b"{}")
    assert storage.exists("zarr.json") and storage.is_file("zarr.json")


@pytest.mark.parametrize("launcher", [torchrun_env, srun_env])
def test_ranks_of_a_launcher_with_several_processes_per_node(launcher, clean_launch_env, monkeypatch):
    """2 nodes x 2 processes: the global rank is the process's rank, its local rank picks its GPU."""
    for var, value in launcher(3, 4, per_node=2).items():
        monkeypatch.setenv(var, value)
    assert resolve_rank(launcher_env=True) == (3, 4)
    assert resolve_rank() == (0, 1)  # readers and the trainer leave the launcher's variables alone
    assert local_rank() == 1
    want = "torchrun's RANK/WORLD_SIZE" if launcher is torchrun_env else "srun's SLURM_PROCID/SLURM_NTASKS"
    assert rank_source() == want
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_of_this_process("cuda") == "cuda:1"
    assert device_of_this_process("cuda:0") == "cuda:0" and device_of_this_process("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # a launcher that binds one GPU to each task
    assert device_of_this_process("cuda") == "cuda:0"


def test_torchrun_inside_srun_and_half_set_launcher_variables(clean_launch_env, monkeypatch):
    for var, value in {**srun_env(1, 2), **torchrun_env(2, 4, per_node=2)}.items():  # srun ... torchrun ...
        monkeypatch.setenv(var, value)
    assert resolve_rank(launcher_env=True) == (2, 4) and local_rank() == 0
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ConfigError, match="WORLD_SIZE not set, but RANK is"):
        resolve_rank(launcher_env=True)
    assert resolve_rank(2, 3, launcher_env=True) == (2, 3)  # explicit values need no launcher



def test_the_claims_a_harvest_writes_carry_its_claim_timeout(tmp_path, monkeypatch):
    """--claim-timeout-s reaches the shard writers: the claim a rank holds while it writes says how
    long a rerun on another machine must wait once that rank is gone (claims.py judges a claim from
    elsewhere by its own timeout)."""
    import json as _json

    from activation_store.harvest import pipeline as _pipeline
    from activation_store.harvest.run import harvest as _harvest
    from activation_store.store import layout as _layout
    from harvest_helpers import cfg_for as _cfg_for, make_images as _make

    _make(tmp_path / "imgs", 4)
    seen = []

    def read_claims(point):
        if point == "harvest_batch":
            seen.extend(_json.loads(p.read_text())["timeout_s"] for p in (tmp_path / "s").rglob(_layout.CLAIM))

    monkeypatch.setattr(_pipeline, "kill_point", read_claims)
    _harvest(_cfg_for(tmp_path / "s", images=str(tmp_path / "imgs"), claim_timeout_s=120.0))
    assert seen and set(seen) == {120.0}
