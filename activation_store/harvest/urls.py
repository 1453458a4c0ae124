"""URL lists (LAION-style parquet or csv with url and caption columns) downloaded by img2dataset
into webdataset shards, one input shard per `number_sample_per_shard` URLs.

Each rank downloads only its own input shards, in a background process, so the ViT works on
shard N while shard N+1 downloads. img2dataset keeps the original bytes (no re-encoding): our
decoder counts what is not an image. Its per-URL failures become `download_error` rows of the
image table, and its `_stats.json` files are merged into the harvest report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from activation_store.errors import ConfigError, SourceError
from activation_store.harvest.decode import DOWNLOAD_ERROR, TRUNCATED_TAR
from activation_store.harvest.sources import InputShard, Sample
from activation_store.tar_shards import TarSamples, image_of


def read_url_list(path: str, url_col: str, caption_col: str | None) -> pa.Table:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"URL list {path} does not exist")
    table = pq.read_table(p) if p.suffix == ".parquet" else pacsv.read_csv(p)
    if url_col not in table.column_names:
        raise ConfigError(f"URL list {path} has no column {url_col!r}; its columns: {table.column_names}")
    cols = [url_col] + ([caption_col] if caption_col and caption_col in table.column_names else [])
    return table.select(cols)


class UrlDownloader:
    def __init__(self, urls: str, cfg, out: str, rank: int, world: int) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world
        self.table = read_url_list(urls, cfg.url_col, cfg.caption_col)
        per = cfg.number_sample_per_shard
        self.n = self.table.num_rows
        if self.n == 0:
            raise ConfigError(f"URL list {urls} is empty")
        self.names = [f"{Path(urls).resolve()}#{i:05d}" for i in range(-(-self.n // per))]
        self.capacity = [min(per, self.n - i * per) for i in range(len(self.names))]
        base = cfg.work_dir or (out.rstrip("/") + ".downloads" if "://" not in out else "downloads")
        self.work = Path(base) / f"rank{rank}"
        # this rank's shards, in a fixed order: local output shard j of img2dataset is mine[j]
        self.mine = [i for i in range(len(self.names)) if i % world == rank]
        self.proc: subprocess.Popen | None = None

    def shards(self) -> list[InputShard]:
        out = []
        for i, name in enumerate(self.names):
            j = self.mine.index(i) if i in self.mine else None
            out.append(InputShard(name, self.capacity[i], self._reader(i, j)))
        return out

    def start(self, todo: list[str]) -> None:
        """Download every shard of this rank that is not yet downloaded (img2dataset's incremental
        mode skips finished ones), in the background."""
        if not todo:
            return
        self.work.mkdir(parents=True, exist_ok=True)
        per = self.cfg.number_sample_per_shard
        rows = [r for i in self.mine for r in range(i * per, min((i + 1) * per, self.n))]
        subset = self.table.take(pa.array(rows, type=pa.int64()))
        url_file = self.work / "urls.parquet"
        pq.write_table(subset, url_file)
        job = {
            "url_list": str(url_file), "input_format": "parquet", "url_col": self.cfg.url_col,
            "caption_col": self.cfg.caption_col if self.cfg.caption_col in subset.column_names else None,
            "output_folder": str(self.work / "shards"), "output_format": "webdataset",
            "number_sample_per_shard": per, "processes_count": self.cfg.processes_count,
            "thread_count": self.cfg.thread_count, "timeout": self.cfg.timeout, "retries": self.cfg.retries,
            "resize_mode": self.cfg.resize_mode, "disable_all_reencoding": self.cfg.resize_mode == "no",
            "incremental_mode": "incremental", "enable_wandb": False, "compute_hash": None,
        }
        job_file = self.work / "job.json"
        job_file.write_text(json.dumps(job))
        env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1",
                   NO_PROXY=",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1,localhost"])))
        self.log = open(self.work / "img2dataset.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "activation_store.harvest.download_job", str(job_file)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def _reader(self, i: int, j: int | None):
        def read() -> Iterator[Sample]:
            if j is None:
                raise SourceError(f"input shard {self.names[i]} belongs to rank {i % self.world}, not to rank "
                                  f"{self.rank}: only its own rank downloads it")
            stem = self.work / "shards" / f"{j:05d}"
            stats = Path(f"{stem}_stats.json")
            while not stats.exists():
                if self.proc is not None and self.proc.poll() is not None and not stats.exists():
                    raise SourceError(
                        f"img2dataset stopped (exit {self.proc.returncode}) before shard {stem.name} was done; "
                        f"see {self.work / 'img2dataset.log'}"
                    )
                time.sleep(0.2)
            yield from _shard_samples(stem)

        return read

    def report(self) -> dict:
        totals: dict[str, int] = {}
        errors: dict[str, int] = {}
        for f in sorted((self.work / "shards").glob("*_stats.json")):
            s = json.loads(f.read_text())
            for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
                totals[k] = totals.get(k, 0) + int(s.get(k, 0))
            for msg, c in (s.get("status_dict") or {}).items():
                if msg != "success":
                    errors[msg] = errors.get(msg, 0) + c
        return {"work_dir": str(self.work), "img2dataset": totals, "errors": errors}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _shard_samples(stem: Path) -> Iterator[Sample]:
    """Every URL of one img2dataset shard in input order: downloaded ones with their bytes, failed
    ones as download_error samples, downloaded ones a damaged tar lost as truncated_tar samples."""
    meta = pq.read_table(f"{stem}.parquet").to_pylist()
    files: dict[str, dict[str, bytes]] = {}
    lost = None
    tar_path = f"{stem}.tar"
    if os.path.exists(tar_path):
        tar = TarSamples(tar_path)
        files = {sample.key: sample.files for sample in tar}
        lost = tar.truncated
    for row, m in enumerate(sorted(meta, key=lambda m: m["key"])):
        key = m["key"]
        if m.get("status") != "success":
            yield Sample(key, None, row, url=m.get("url"), caption=m.get("caption"), status=DOWNLOAD_ERROR,
                         error=m.get("error_message") or m.get("status"))
        elif key not in files and lost is not None:
            yield Sample(key, None, row, url=m.get("url"), caption=m.get("caption"), status=TRUNCATED_TAR,
                         error=f"{tar_path}: {lost}")
        else:
            yield Sample(key, image_of(files.get(key, {})), row, url=m.get("url"), caption=m.get("caption"))
