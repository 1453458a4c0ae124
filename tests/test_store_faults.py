"""Faults: a store's creation and planning killed at every step resume to the store an uninterrupted
run makes; a full disk and a read-only file system give one line of our own error, commit nothing
false, and a rerun after the fix gives the same bytes."""

import os
import subprocess
import sys

import numpy as np
import pytest

from activation_store.errors import StorageWriteError, StoreNotFoundError
from activation_store.store import open_store
from store_helpers import make_store, write_shard

HERE = os.path.dirname(__file__)
SHARDS = (("a", 0, 6), ("b", 1, 11))

# what a harvest does: open or create the store, plan its shards, write those not yet committed
RUN = """
import sys
from activation_store.errors import StoreNotFoundError
from activation_store.store import open_store
from store_helpers import make_store, write_shard
url = sys.argv[1]
try:
    store = open_store(url)
except StoreNotFoundError:
    store = make_store(url)
store.plan_shards([("a", 6), ("b", 11)])
for src, seed, n in {shards!r}:
    if not store.shard(src).committed:
        write_shard(store, src, seed, n, dropped=1)
print("DONE")
""".format(shards=SHARDS)


def _run(url, kill_at=None):
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("ACTSTORE_KILL_AT", None)
    if kill_at:
        env["ACTSTORE_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-c", RUN, url], env=env, capture_output=True, text=True, timeout=120)


def _same_store(got_url, want_url):
    got, want = open_store(got_url), open_store(want_url)
    assert got.capacity == want.capacity and got.n_images == want.n_images == 17
    for loc in want.locations:
        np.testing.assert_array_equal(got.read_rows(loc, raw=True), want.read_rows(loc, raw=True))
        np.testing.assert_array_equal(got.read_cls(loc, raw=True), want.read_cls(loc, raw=True))
    assert got.images(include_dropped=True).equals(want.images(include_dropped=True))

    def states(s):
        return [dict(x.to_attrs(), commit={k: v for k, v in x.commit.items() if k != "committed_at"}) for x in s.shards()]

    assert states(got) == states(want)
    files, ref = got.storage.list_files(""), want.storage.list_files("")
    assert sorted(files) == sorted(ref)  # no marker, temporary or claim left over, nothing missing
    for key in ref:
        if "/c/" in key:
            assert got.storage.read_bytes(key) == want.storage.read_bytes(key), key


@pytest.mark.parametrize("point", ["store_create", "store_plan"])
def test_creation_and_planning_killed_at_every_step_resume_to_the_uninterrupted_store(tmp_path, point):
    reference = str(tmp_path / "reference")
    assert "DONE" in _run(reference).stdout
    killed_at = []
    for n in range(1, 40):
        url = str(tmp_path / f"{point}-{n}")
        done = _run(url, f"{point}:{n}")
        if done.returncode == 0:  # the run has fewer steps than n: every step was killed once
            break
        assert done.returncode == -9, done.stderr  # SIGKILL at the n-th step, nothing else
        killed_at.append(n)
        if point == "store_create" and not os.path.exists(os.path.join(url, "zarr.json")):
            with pytest.raises(StoreNotFoundError, match="creation was interrupted"):
                open_store(url)  # an unfinished creation is no store yet ...
        rerun = _run(url)  # ... and a fresh process finishes it
        assert rerun.returncode == 0 and "DONE" in rerun.stdout, rerun.stderr
        _same_store(url, reference)
    # the marker, 2 groups and 4 arrays, the root; 4 arrays grown, 2 shard groups
    assert killed_at == list(range(1, {"store_create": 9, "store_plan": 7}[point]))


def test_an_interrupted_creation_says_so_and_a_rerun_with_other_settings_replaces_it(tmp_path):
    url = str(tmp_path / "s")
    env = dict(os.environ, PYTHONPATH=HERE, ACTSTORE_KILL_AT="store_create:6")
    code = "import sys; from store_helpers import make_store; make_store(sys.argv[1], locations='resid_2,resid_5,resid_7')"
    assert subprocess.run([sys.executable, "-c", code, url], env=env).returncode == -9
    with pytest.raises(StoreNotFoundError, match="creation was interrupted.*rerun"):
        open_store(url)
    store = make_store(url, locations="resid_2")  # other locations: what the first attempt wrote goes
    assert store.locations == ["resid_2"]
    assert sorted(os.listdir(url)) == ["cls", "resid_2", "shards", "zarr.json"]
    assert os.listdir(os.path.join(url, "cls")) == ["resid_2", "zarr.json"]


def test_plan_repairs_arrays_shorter_than_the_planned_regions(store_factory):
    """A 1.0 planner killed after writing its shard groups left the arrays short of the regions."""
    import json

    store = store_factory()
    store.plan_shards([("a", 6), ("b", 9)])
    for key in store.array_keys():  # shrink the metadata back, as if the resize never happened
        path = os.path.join(store.url, key, "zarr.json")
        doc = json.load(open(path))
        doc["shape"][0] = 0
        json.dump(doc, open(path, "w"))
    s = open_store(store.url)
    assert s.capacity == 0
    s.plan_shards([("a", 6), ("b", 9)])
    assert open_store(store.url).capacity == 24
    write_shard(s, "b", 1, 9)
    assert open_store(store.url).n_images == 9


# ---------------------------------------------------------------------------- full and read-only disks
@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root only); unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _remount(mnt, options):
    subprocess.run(["mount", "-o", f"remount,{options}", str(mnt)], check=True)


def _chunks(store):
    return {k: store.storage.read_bytes(k) for k in store.storage.list_files("") if "/c/" in k}


def _one_line(err):
    text = str(err)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_a_full_disk_is_one_line_of_our_error_commits_nothing_and_a_rerun_gives_the_same_bytes(small_disk, tmp_path):
    reference = make_store(str(tmp_path / "reference"), codec="zstd")
    reference.plan_shards([("a", 6), ("b", 40)])
    write_shard(reference, "a", 0, 6)
    write_shard(reference, "b", 1, 40, dropped=2)

    url = str(small_disk / "store")
    store = make_store(url, codec="zstd")
    store.plan_shards([("a", 6), ("b", 40)])
    write_shard(store, "a", 0, 6)
    free = os.statvfs(small_disk)
    filler = small_disk / "someone-elses-file"
    filler.write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 8 * 4096))  # leaves 8 pages
    with pytest.raises(StorageWriteError) as e:
        write_shard(store, "b", 1, 40, dropped=2)
    msg = _one_line(e.value)
    assert f"no space left on {small_disk}" in msg and "free space and rerun the same command" in msg
    s = open_store(url)
    assert s.n_images == 6 and s.shard("b").state == "writing"  # nothing of b is committed
    assert not os.path.exists(os.path.join(url, "shards", "s000001", "writer.claim"))  # released on the error
    filler.unlink()  # the user frees space and reruns
    write_shard(open_store(url), "b", 1, 40, dropped=2)
    s = open_store(url)
    assert s.n_images == 46
    assert _chunks(s) == _chunks(reference)
    assert s.images(include_dropped=True).equals(open_store(reference.url).images(include_dropped=True))


def test_a_read_only_file_system_is_one_line_of_our_error(small_disk):
    url = str(small_disk / "store")
    store = make_store(url)
    store.plan_shards([("a", 6)])
    _remount(small_disk, "ro")
    try:
        with pytest.raises(StorageWriteError) as e:
            write_shard(open_store(url), "a", 0, 6)
        assert "read-only file system" in _one_line(e.value) and "rerun the same command" in str(e.value)
        with pytest.raises(StorageWriteError, match="read-only"):
            make_store(str(small_disk / "other"))
        with pytest.raises(StorageWriteError, match="read-only"):
            open_store(url).plan_shards([("b", 3)])
        s = open_store(url)
        assert s.n_images == 0 and s.shard("a").state == "planned"
        assert s.read_rows("resid_2").shape[0] == 0  # reading still works
    finally:
        _remount(small_disk, "rw")
    write_shard(open_store(url), "a", 0, 6)
    assert open_store(url).n_images == 6


def test_refused_writes_name_what_to_do(tmp_path):
    import errno

    from activation_store.store.storage import Storage

    s = Storage(str(tmp_path / "store"))
    cases = {
        errno.ENOSPC: "no space left on", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
        errno.EACCES: "is not writable (permission denied", errno.EIO: "failed (Input/output error)",
    }
    for code, text in cases.items():
        err = s.write_error(OSError(code, os.strerror(code)), "resid_2/c/0/0/0")
        assert isinstance(err, StorageWriteError) and text in str(err) and "resid_2/c/0/0/0" in str(err)
        assert "rerun the same command" in str(err) and "\n" not in str(err)
