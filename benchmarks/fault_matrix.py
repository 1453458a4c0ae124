"""Faults injected on purpose, in their randomised versions: kill -9 at random points of harvests and
training runs (then rerun and compare with an uninterrupted run), every metadata and data object of a
store deleted, flipped or truncated (then `actstore verify` and a full read), the bad-input corpus,
and two writers of one shard. Prints a table ("kill -9 harvest: 20/20 identical") and writes JSON.

    python benchmarks/fault_matrix.py            # 20 harvest kills, 8 training kills, the full matrix
    python benchmarks/fault_matrix.py --quick    # a few of each (about two minutes)

A case fails when data is lost or silently wrong, a command hangs (runs past --timeout) or prints a
traceback. The numbers go in docs/reliability.md."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from harvest_helpers import TINY, bad_corpus, make_images  # noqa: E402

PY = sys.executable
CLI = [PY, "-m", "activation_store.cli"]
BATCH, SHARD, IMAGES = 2, 12, 36  # 3 input shards of 12 images, batches of 2: 18 batches in all
READ_ALL = """
import hashlib, sys
from activation_store import open_store
from activation_store.errors import ActivationStoreError
try:
    s = open_store(sys.argv[1])
    h = hashlib.sha256()
    for loc in s.locations:
        h.update(s.read_rows(loc).tobytes()); h.update(s.read_cls(loc).tobytes())
        for g, m in s.stats_by_group(loc).items():
            h.update(m.to_array().tobytes()); h.update(str(m.count).encode())
    t = s.images().sort_by("row")
    for col in ("key", "row", "status", "source_shard", "source_row"):
        h.update(repr(t[col].to_pylist()).encode())
    print("DIGEST", h.hexdigest())
except ActivationStoreError as exc:
    print("OURERROR", type(exc).__name__, exc)
"""


def run(cmd, timeout: float, env=None) -> dict:
    """A command's exit code, whether it printed a traceback, whether it hung."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"rc": None, "hung": True, "traceback": False, "out": "", "err": ""}
    return {"rc": done.returncode, "hung": False, "traceback": "Traceback (most recent call last)" in done.stderr,
            "out": done.stdout, "err": done.stderr}


def digest(store: str, timeout: float) -> str:
    r = run([PY, "-c", READ_ALL, store], timeout)
    if r["hung"] or r["traceback"]:
        return "HUNG" if r["hung"] else "TRACEBACK"
    line = (r["out"].strip().splitlines() or [""])[-1]
    return line.split()[1] if line.startswith("DIGEST") else "OURERROR " + line


def harvest_cmd(images: Path, out: Path) -> list[str]:
    return [*CLI, "harvest", "--images", str(images), "--out", str(out), "--model", TINY, "--pretrained", "none",
            "--layers", "1,3", "--batch-size", str(BATCH), "--workers", "0", "--chunk-images", "4",
            "--region-images", "8", "--shard-size", str(SHARD), "--no-progress", "--report", f"{out}.report.json"]


def env_killing(point: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ACTSTORE_KILL_AT"}
    if point:
        env["ACTSTORE_KILL_AT"] = point
    return env


# ---------------------------------------------------------------------------- kill -9
HARVEST_POINTS = [("harvest_batch", IMAGES // BATCH), ("store_create", 4), ("store_plan", 3)]


def harvest_kills(work: Path, trials: int, rng: random.Random, timeout: float) -> dict:
    images = work / "imgs"
    make_images(images, IMAGES)
    ref = work / "ref"
    run(harvest_cmd(images, ref), timeout, env_killing(None))
    want = digest(str(ref), timeout)
    rows = []
    for t in range(trials):
        name, top = rng.choice(HARVEST_POINTS)
        point = f"{name}:{rng.randint(1, top)}"
        out = work / f"h{t}"
        first = run(harvest_cmd(images, out), timeout, env_killing(point))
        again = run(harvest_cmd(images, out), timeout, env_killing(None))
        got = digest(str(out), timeout)
        rows.append({"point": point, "killed": first["rc"] == -signal.SIGKILL, "rerun_rc": again["rc"],
                     "identical": got == want, "hung": first["hung"] or again["hung"],
                     "traceback": again["traceback"]})
        shutil.rmtree(out, ignore_errors=True)
    return _summary("kill -9 harvest", rows, "identical")


def training_kills(work: Path, trials: int, rng: random.Random, timeout: float) -> dict:
    store = work / "ref"  # the harvested reference store
    total, batch = 12_800, 128
    cmd = lambda out: [*CLI, "train", str(store), "--location", "resid_3", "--out", str(out), "--latents", "64",  # noqa: E731
                       "--k", "4", "--batch-size", str(batch), "--total-tokens", str(total), "--warmup-tokens",
                       "0", "--checkpoint-every", "2560", "--buffer-tokens", "2048", "--holdout", "0.1"]
    run(cmd(work / "tref"), timeout, env_killing(None))
    want = _weights(work / "tref")
    rows = []
    for t in range(trials):
        point = f"train_step:{rng.randint(1, total // batch - 1)}"
        out = work / f"t{t}"
        first = run(cmd(out), timeout, env_killing(point))
        again = run(cmd(out), timeout, env_killing(None))
        rows.append({"point": point, "killed": first["rc"] == -signal.SIGKILL, "rerun_rc": again["rc"],
                     "identical": _weights(out) == want, "hung": first["hung"] or again["hung"],
                     "traceback": again["traceback"]})
        shutil.rmtree(out, ignore_errors=True)
    return _summary("kill -9 training", rows, "identical")


def _weights(run_dir: Path) -> str | None:
    found = sorted((run_dir / "checkpoints").glob("[0-9]*"))
    return hashlib.sha256((found[-1] / "sae.safetensors").read_bytes()).hexdigest() if found else None


# ---------------------------------------------------------------------------- metadata and data faults
def _targets(store: Path) -> dict[str, Path]:
    """One object of each kind the store holds."""
    main_chunk = next(p for p in sorted((store / "resid_1" / "c").rglob("*")) if p.is_file())
    cls_chunk = next(p for p in sorted((store / "cls" / "resid_1" / "c").rglob("*")) if p.is_file())
    moments = store / "shards" / "s000000" / "moments"
    moments_chunk = next(p for p in sorted((moments / "c").rglob("*")) if p.is_file())
    return {"root zarr.json": store / "zarr.json", "array zarr.json": store / "resid_1" / "zarr.json",
            "CLS array zarr.json": store / "cls" / "resid_1" / "zarr.json",
            "shard zarr.json": store / "shards" / "s000000" / "zarr.json",
            "moments zarr.json": moments / "zarr.json", "moments chunk": moments_chunk,
            "images.parquet": store / "shards" / "s000000" / "images.parquet",
            "main chunk": main_chunk, "CLS chunk": cls_chunk}


def _damage(path: Path, how: str, rng: random.Random) -> None:
    data = path.read_bytes()
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # flip one byte
        i = rng.randrange(len(data))
        path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])


def metadata_matrix(work: Path, flips: int, rng: random.Random, timeout: float) -> dict:
    ref = work / "ref"
    want = digest(str(ref), timeout)
    rows = []
    for kind in _targets(ref):
        for how in ("delete", "truncate", *["flip"] * flips):
            case = work / "m"
            shutil.rmtree(case, ignore_errors=True)
            shutil.copytree(ref, case)
            _damage(_targets(case)[kind], how, rng)
            verify = run([*CLI, "verify", str(case), "--quiet"], timeout)
            got = digest(str(case), timeout)
            read = "same data" if got == want else ("our error" if got.startswith("OURERROR") else
                                                    got.lower() if got in ("HUNG", "TRACEBACK") else "WRONG DATA")
            # 1: problems listed; 2: the store cannot be opened at all, said in one line of ours
            detected = verify["rc"] in (1, 2)
            ok = not verify["traceback"] and not verify["hung"] and (
                read == "same data" or (read == "our error" and detected))
            rows.append({"object": kind, "fault": how, "verify_rc": verify["rc"], "verify_traceback": verify["traceback"],
                         "read": read, "ok": ok})
    return _summary("metadata/data faults", rows, "ok")


# ---------------------------------------------------------------------------- inputs and writers
def bad_inputs(work: Path, timeout: float) -> dict:
    folder = work / "bad"
    expected = bad_corpus(folder)
    out = work / "bad.zarr"
    r = run(harvest_cmd(folder, out), timeout, env_killing(None))
    counted = 0
    if r["rc"] == 0:
        report = json.loads(Path(f"{out}.report.json").read_text())
        counted = report["images"]["seen"]
    row = {"files": len(expected), "counted": counted, "rc": r["rc"], "traceback": r["traceback"], "hung": r["hung"],
           "ok": r["rc"] == 0 and counted == len(expected) and not r["traceback"]}
    return _summary("bad-input corpus", [row], "ok")


TWO_WRITERS = """
import sys, numpy as np
from activation_store.store import ActivationStore, ImageRecord, StoreConfig, open_store
from activation_store.store.audit import verify
from activation_store.errors import ActivationStoreError
s = ActivationStore.create(sys.argv[1], locations="resid_0", n_tokens=3, d_model=4,
                           config=StoreConfig(chunk_images=2, region_images=4))
s.plan_shards([("a", 8)])
x = np.arange(8 * 3 * 4, dtype=np.float32).reshape(8, 3, 4)
first = s.writer("a")
first.add({"resid_0": x[:4]}, [ImageRecord(str(i)) for i in range(4)])
try:
    second = open_store(sys.argv[1]).writer("a")
    print("SECOND_ACCEPTED")
    second.add({"resid_0": x[:2]}, [ImageRecord("z0"), ImageRecord("z1")])
    second.commit()
except ActivationStoreError as exc:
    print("SECOND_REFUSED", type(exc).__name__)
first.add({"resid_0": x[4:]}, [ImageRecord(str(i)) for i in range(4, 8)])
first.commit()
s = open_store(sys.argv[1])
ok = not verify(s, progress=False) and np.array_equal(s.read_rows("resid_0"), x)
print("FIRST_INTACT" if ok else "FIRST_DAMAGED")
"""


def two_writers(work: Path, timeout: float) -> dict:
    r = run([PY, "-c", TWO_WRITERS, str(work / "two.zarr")], timeout)
    row = {"second_refused": "SECOND_REFUSED" in r["out"], "first_intact": "FIRST_INTACT" in r["out"],
           "traceback": r["traceback"], "hung": r["hung"]}
    row["ok"] = row["second_refused"] and row["first_intact"] and not r["traceback"] and not r["hung"]
    return _summary("two writers of one shard", [row], "ok")


# ---------------------------------------------------------------------------- the table
def _summary(name: str, rows: list[dict], good: str) -> dict:
    return {"name": name, "cases": len(rows), "good": sum(bool(r[good]) for r in rows), "criterion": good,
            "hung": sum(bool(r.get("hung")) for r in rows),
            "tracebacks": sum(bool(r.get("traceback") or r.get("verify_traceback")) for r in rows),
            "killed": sum(bool(r.get("killed")) for r in rows) if rows and "killed" in rows[0] else None,
            "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--harvest-trials", type=int, default=20)
    ap.add_argument("--train-trials", type=int, default=8)
    ap.add_argument("--flips", type=int, default=3, help="random single-byte flips per object kind")
    ap.add_argument("--quick", action="store_true", help="3 harvest and 2 training kills, 1 flip per object")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300, help="seconds after which a command counts as hung")
    ap.add_argument("--json", default="benchmarks/results/fault_matrix.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.harvest_trials, args.train_trials, args.flips = 3, 2, 1
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        work = Path(tmp)
        results = [harvest_kills(work, args.harvest_trials, rng, args.timeout),
                   training_kills(work, args.train_trials, rng, args.timeout),
                   metadata_matrix(work, args.flips, rng, args.timeout),
                   bad_inputs(work, args.timeout), two_writers(work, args.timeout)]
    print(f"{'fault':<28} {'result':<22} {'killed':>7} {'hung':>5} {'tracebacks':>10}")
    for r in results:
        killed = "-" if r["killed"] is None else r["killed"]
        print(f"{r['name']:<28} {str(r['good']) + '/' + str(r['cases']) + ' ' + r['criterion']:<22} {killed:>7} "
              f"{r['hung']:>5} {r['tracebacks']:>10}")
    for r in results:
        for row in r["rows"]:
            if not row.get(r["criterion"]):
                print(f"  FAILED {r['name']}: {json.dumps({k: v for k, v in row.items() if k != 'ok'})}")
    print(f"\n({platform.node()}, {os.cpu_count()} CPUs, {time.perf_counter() - t0:.0f} s)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(),
                                           "args": vars(args), "results": results}, indent=2))
    return 0 if all(r["good"] == r["cases"] and not r["hung"] and not r["tracebacks"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
