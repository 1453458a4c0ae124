"""URL lists (LAION-style parquet or csv with url and caption columns) downloaded by img2dataset
into webdataset shards, one input shard per `number_sample_per_shard` URLs.

Each rank downloads only its own input shards, in a background process, so the ViT works on
shard N while shard N+1 downloads. img2dataset keeps the original bytes (no re-encoding): our
decoder counts what is not an image. Its per-URL failures become `download_error` rows of the
image table, and its `_stats.json` files are merged into the harvest report.

Only http(s) URLs to public addresses are handed to img2dataset (`check_urls`): a host name is
resolved, and one that resolves to a loopback, private, link-local or other non-public address
is refused like an address literal; a name that does not resolve is left to img2dataset, which
fails it. Refused URLs are `refused_url` rows, with the reason. `allow_private_urls` and
`allow_file_urls` opt in. The check runs once, before the download (img2dataset resolves again and
follows redirects: a hostile DNS server or a redirect can still reach a private address).

Which URLs were refused is decided once per work folder and kept in its `plan.json`, so a rerun
reads the downloaded shards with the same refusals whatever DNS answers later."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from activation_store.errors import ConfigError, SourceError
from activation_store.harvest.decode import DOWNLOAD_ERROR, REFUSED_URL, TRUNCATED_TAR
from activation_store.harvest.sources import InputShard, Sample
from activation_store.tar_shards import TarSamples, image_of, image_span


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
        self.source = str(Path(urls).resolve())
        self.names = [f"{self.source}#{i:05d}" for i in range(-(-self.n // per))]
        self.capacity = [min(per, self.n - i * per) for i in range(len(self.names))]
        base = cfg.work_dir or (out.rstrip("/") + ".downloads" if "://" not in out else "downloads")
        self.work = Path(base) / f"rank{rank}"
        # this rank's shards, in a fixed order; img2dataset's output shards follow it (plan.json)
        self.mine = [i for i in range(len(self.names)) if i % world == rank]
        self.proc: subprocess.Popen | None = None
        self._plans: dict[int, dict] | None = None

    def shards(self) -> list[InputShard]:
        out = []
        for i, name in enumerate(self.names):
            out.append(InputShard(name, self.capacity[i], self._reader(i)))
        return out

    def start(self, todo: list[str]) -> None:
        """Download every shard of this rank that is not yet downloaded (img2dataset's incremental
        mode skips finished ones), in the background. Refused URLs are never handed over: each of
        this rank's input shards with any URL left is one file of img2dataset's URL folder, so one
        of its output shards."""
        if not todo:
            return
        self.work.mkdir(parents=True, exist_ok=True)
        plan = self._plan()
        url_dir = self.work / "urls"
        shutil.rmtree(url_dir, ignore_errors=True)
        url_dir.mkdir()
        per = self.cfg.number_sample_per_shard
        for i in self.mine:
            if plan[i]["download"] is None:
                continue  # every URL of it is refused: nothing to download
            rows = [r for r in range(i * per, min((i + 1) * per, self.n)) if str(r - i * per) not in plan[i]["refused"]]
            pq.write_table(self.table.take(pa.array(rows, type=pa.int64())), url_dir / f"{i:08d}.parquet")
        if not any(plan[i]["download"] is not None for i in self.mine):
            return
        job = {
            "url_list": str(url_dir), "input_format": "parquet", "url_col": self.cfg.url_col,
            "caption_col": self.cfg.caption_col if self.cfg.caption_col in self.table.column_names else None,
            "output_folder": str(self.work / "shards"), "output_format": "webdataset",
            "number_sample_per_shard": per, "processes_count": self.cfg.processes_count,
            "thread_count": self.cfg.thread_count, "timeout": self.cfg.timeout, "retries": self.cfg.retries,
            "resize_mode": self.cfg.resize_mode, "image_size": self.cfg.image_size,
            "disable_all_reencoding": self.cfg.resize_mode == "no",
            "incremental_mode": "incremental", "enable_wandb": False, "compute_hash": None,
        }
        job_file = self.work / "job.json"
        job_file.write_text(json.dumps(job))
        env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1",
                   NO_PROXY=",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1,localhost"])))
        self.log = open(self.work / "img2dataset.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "activation_store.harvest.download_job", str(job_file)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def _plan(self) -> dict[int, dict]:
        """{input shard: {"download": img2dataset shard or None, "refused": {offset: reason}}} for
        this rank's shards: read from the work folder's plan.json when it was made for this URL list
        and these settings, else decided now (and downloads made under another plan are removed)."""
        if self._plans is not None:
            return self._plans
        per = self.cfg.number_sample_per_shard
        urls = self.table[self.cfg.url_col].to_pylist()
        mine_urls = [urls[r] for i in self.mine for r in range(i * per, min((i + 1) * per, self.n))]
        head = {"url_list": self.source, "rows": self.n, "per_shard": per, "rank": self.rank, "world": self.world,
                "allow_private_urls": self.cfg.allow_private_urls, "allow_file_urls": self.cfg.allow_file_urls,
                "urls_sha256": hashlib.sha256(json.dumps(mine_urls).encode()).hexdigest(),
                # shards resized otherwise hold other pixels: download again
                "resize": list(self.cfg.resize_of(self.cfg.resize_mode, self.cfg.image_size))}
        self.work.mkdir(parents=True, exist_ok=True)
        path = self.work / "plan.json"
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            saved = None
        if isinstance(saved, dict) and saved.get("head") == head:
            self._plans = {int(i): p for i, p in saved["shards"].items()}
            return self._plans
        shutil.rmtree(self.work / "shards", ignore_errors=True)  # made under another plan: shard numbers differ
        reasons = iter(check_urls(mine_urls, self.cfg.allow_private_urls, self.cfg.allow_file_urls))
        plans, downloads = {}, 0
        for i in self.mine:
            refused = {}
            for offset in range(self.capacity[i]):
                reason = next(reasons)
                if reason is not None:
                    refused[str(offset)] = reason
            download = None if len(refused) == self.capacity[i] else downloads
            downloads += download is not None
            plans[i] = {"download": download, "refused": refused}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"head": head, "shards": {str(i): p for i, p in plans.items()}}))
        os.replace(tmp, path)
        self._plans = plans
        return plans

    def _reader(self, i: int):
        def read() -> Iterator[Sample]:
            if i not in self.mine:
                raise SourceError(f"input shard {self.names[i]} belongs to rank {i % self.world}, not to rank "
                                  f"{self.rank}: only its own rank downloads it")
            plan = self._plan()[i]
            per = self.cfg.number_sample_per_shard
            rows = self.table.slice(i * per, self.capacity[i]).to_pylist()
            got = iter(()) if plan["download"] is None else self._downloaded(plan["download"])
            for offset, row in enumerate(rows):
                url, caption = row[self.cfg.url_col], row.get(self.cfg.caption_col) if self.cfg.caption_col else None
                reason = plan["refused"].get(str(offset))
                if reason is not None:
                    yield Sample(f"url-row-{i * per + offset}", None, offset, url=url, caption=caption,
                                 status=REFUSED_URL, error=reason)
                    continue
                sample = next(got, None)
                if sample is None or sample.url != url:
                    raise SourceError(
                        f"the downloads in {self.work} do not match {self.source} (row {i * per + offset}: "
                        f"{url!r}); delete {self.work} and rerun")
                sample.source_row = offset
                yield sample

        return read

    def _downloaded(self, shard: int) -> Iterator[Sample]:
        """The samples of one img2dataset output shard, once it is done."""
        stem = self.work / "shards" / f"{shard:05d}"
        stats = Path(f"{stem}_stats.json")
        while not stats.exists():
            if self.proc is None or (self.proc.poll() is not None and not stats.exists()):
                state = "was not started" if self.proc is None else f"stopped (exit {self.proc.returncode})"
                raise SourceError(f"img2dataset {state} before shard {stem.name} was done; see "
                                  f"{self.work / 'img2dataset.log'}")
            time.sleep(0.2)
        yield from _shard_samples(stem)

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
    samples: dict = {}
    lost = None
    tar_path = os.path.abspath(f"{stem}.tar")
    if os.path.exists(tar_path):
        tar = TarSamples(tar_path)
        samples = {sample.key: sample for sample in tar}
        lost = tar.truncated
    for row, m in enumerate(sorted(meta, key=lambda m: m["key"])):
        key = m["key"]
        if m.get("status") != "success":
            yield Sample(key, None, row, url=m.get("url"), caption=m.get("caption"), status=DOWNLOAD_ERROR,
                         error=m.get("error_message") or m.get("status"))
        elif key not in samples and lost is not None:
            yield Sample(key, None, row, url=m.get("url"), caption=m.get("caption"), status=TRUNCATED_TAR,
                         error=f"{tar_path}: {lost}")
        elif key in samples:
            start, size = image_span(samples[key])
            yield Sample(key, image_of(samples[key].files), row, url=m.get("url"), caption=m.get("caption"),
                         data_url=tar_path, data_offset=start, data_size=size)
        else:
            yield Sample(key, None, row, url=m.get("url"), caption=m.get("caption"))


# ---------------------------------------------------------------------------- which URLs are fetched
def resolve_host(host: str) -> list[str] | None:
    """The addresses a host name resolves to, or None when it does not resolve."""
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)})
    except (OSError, UnicodeError):  # socket.gaierror is an OSError
        return None


def _non_public(address: str) -> str | None:
    """What kind of non-public address this is, or None for a public one."""
    addr = ipaddress.ip_address(address.split("%")[0])  # an IPv6 zone (fe80::1%eth0)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for kind in ("unspecified", "loopback", "link_local", "private", "multicast", "reserved"):
        if getattr(addr, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if addr.is_global else "non-public"


def check_urls(urls: list, allow_private: bool = False, allow_file: bool = False) -> list[str | None]:
    """For each URL, None when it may be downloaded, else why it is refused: a scheme other than
    http(s) (file:// only with `allow_file`), no host, or (unless `allow_private`) a host that is or
    resolves to a non-public address. Names are resolved in parallel, once each; one that does not
    resolve is left to the downloader."""
    checked = [_on_its_face(url, allow_file) for url in urls]
    if allow_private:
        return [reason for reason, _ in checked]
    names = sorted({host for _, host in checked if host and not _is_address(host)})
    resolved = {}
    if names:
        with ThreadPoolExecutor(min(32, len(names))) as pool:
            resolved = dict(zip(names, pool.map(resolve_host, names)))
    return [reason if host is None else _address_refusal(host, resolved.get(host)) for reason, host in checked]


def _on_its_face(url, allow_file: bool) -> tuple[str | None, str | None]:
    """(why the URL is refused, or None; the host whose address decides, or None)."""
    if not isinstance(url, str) or not url.strip():
        return "no URL", None
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        return f"not a URL: {exc}", None
    scheme = parts.scheme.lower()
    if scheme == "file" and allow_file:
        return None, None
    if scheme not in ("http", "https"):
        hint = " (--download-allow-file-urls downloads file:// URLs)" if scheme == "file" else ""
        return f"scheme {scheme or '(none)'!r}: only http(s) URLs are downloaded{hint}", None
    if not host:
        return "no host in the URL", None
    return None, host


def _address_refusal(host: str, resolved: list[str] | None) -> str | None:
    hint = " (--download-allow-private-urls downloads from such addresses)"
    if _is_address(host):
        kind = _non_public(host)
        return None if kind is None else f"{host} is a {kind} address{hint}"
    for address in resolved or ():
        kind = _non_public(address)
        if kind is not None:
            return f"{host} resolves to the {kind} address {address}{hint}"
    return None


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%")[0])
        return True
    except ValueError:
        return False
