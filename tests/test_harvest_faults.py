"""A failure anywhere in the harvest pipeline (the writer thread, storage, a decode worker, the
forward) stops the harvest with one clear error instead of hanging, leaves the shard uncommitted,
and a rerun gives the store of an uninterrupted run. Failures are injected at exact calls; the
timeouts are only a safety net (the bug they guard against is a hang)."""

import errno
import os
import signal
import threading

import pytest

from activation_store.cli import main
from activation_store.errors import ActivationStoreError, HarvestError, NonFiniteActivationError
from activation_store.harvest import pipeline
from activation_store.harvest.model import LoadedViT
from activation_store.harvest.run import harvest
from activation_store.store import open_store
from activation_store.store.storage import Storage
from activation_store.store.writer import ShardWriter
from harvest_helpers import TINY, cfg_for, data_objects, make_images

pytestmark = pytest.mark.timeout(240)

N_IMAGES, SHARD_SIZE, BATCH = 36, 12, 2  # 3 input shards of 6 batches each


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A folder of images and the store of its uninterrupted harvest."""
    root = tmp_path_factory.mktemp("faults")
    make_images(root / "imgs", N_IMAGES)
    harvest(_cfg(root / "ref", root / "imgs"))
    return root / "imgs", data_objects(str(root / "ref"))


def _cfg(out, folder, workers=0):
    return cfg_for(out, images=str(folder), workers=workers, shard_size=SHARD_SIZE, batch_size=BATCH)


def _fail_on_call(monkeypatch, owner, name, n, exc):
    """`owner.name` raises `exc` on its n-th call (counted over every thread), and works otherwise."""
    original = getattr(owner, name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise exc
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return calls


def _assert_stopped_then_rerun_completes(monkeypatch, out, folder, workers, reference_objects, excinfo):
    message = str(excinfo.value)
    assert "\n" not in message and "input shard" in message and "rerun the same command" in message
    store = open_store(str(out))
    assert [s.state for s in store.shards()] == ["committed", "writing", "planned"]
    assert store.n_images == SHARD_SIZE  # only the committed shard is visible
    monkeypatch.undo()
    report = harvest(_cfg(out, folder, workers))
    assert report["input_shards"]["skipped_committed"] == 1 and report["input_shards"]["harvested"] == 2
    got, got_table = data_objects(str(out))
    want, want_table = reference_objects
    assert sorted(got) == sorted(want) and all(got[k] == want[k] for k in want)
    assert got_table.equals(want_table)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_writer_that_fails_while_the_main_thread_waits_on_it_stops_the_harvest(tmp_path, monkeypatch, reference,
                                                                                 workers):
    """The writer thread hits a full disk on the 8th batch (shard 1's 2nd) just when the main thread
    has filled the queue and waits for a free host slot: it used to wait forever."""
    folder, ref = reference
    waits, adds, filled = [], [], threading.Event()
    free_slot, add = pipeline.ShardRunner._free_slot, ShardWriter.add

    def counted_wait(self, failure):
        waits.append(1)
        if len(waits) == 11:  # batches 9 and 10 hold the other two slots; batch 11 needs the 8th's
            filled.set()
        return free_slot(self, failure)

    def failing_add(self, *args, **kwargs):
        adds.append(1)
        if len(adds) == 8:  # holding batch 8's slot, the main thread can run batches up to the 11th
            assert filled.wait(timeout=120), "the main thread did not get to batch 11"  # a safety net only
            raise OSError(errno.ENOSPC, "No space left on device")
        return add(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.ShardRunner, "_free_slot", counted_wait)
    monkeypatch.setattr(ShardWriter, "add", failing_add)
    with pytest.raises(HarvestError) as excinfo:
        harvest(_cfg(tmp_path / "s", folder, workers))
    message = str(excinfo.value)
    assert "writing it to the store failed: OSError: [Errno 28] No space left on device" in message
    assert "free space" in message and isinstance(excinfo.value.__cause__, OSError)
    _assert_stopped_then_rerun_completes(monkeypatch, tmp_path / "s", folder, workers, ref, excinfo)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_storage_write_that_fails_stops_the_harvest_and_a_rerun_completes(tmp_path, monkeypatch, reference,
                                                                            workers):
    folder, ref = reference
    commits = []
    commit = ShardWriter.commit

    def counted_commit(self):
        done = commit(self)
        commits.append(self.shard.index)
        return done

    monkeypatch.setattr(ShardWriter, "commit", counted_commit)
    write_chunk = Storage.write_chunk

    def failing(self, key, parts):  # the first chunk of shard 1: an object store's 5xx
        if commits:
            raise OSError(errno.EIO, "S3 PUT failed: 503 Service Unavailable")
        return write_chunk(self, key, parts)

    monkeypatch.setattr(Storage, "write_chunk", failing)
    with pytest.raises(ActivationStoreError) as excinfo:  # ours: a HarvestError, or the store's own error type
        harvest(_cfg(tmp_path / "s", folder, workers))
    assert "503 Service Unavailable" in str(excinfo.value)
    _assert_stopped_then_rerun_completes(monkeypatch, tmp_path / "s", folder, workers, ref, excinfo)


def test_a_failing_forward_stops_the_harvest_and_a_rerun_completes(tmp_path, monkeypatch, reference):
    folder, ref = reference
    _fail_on_call(monkeypatch, LoadedViT, "forward", 8, RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB"))
    with pytest.raises(HarvestError) as excinfo:
        harvest(_cfg(tmp_path / "s", folder))
    message = str(excinfo.value)
    assert "the model's forward pass failed: RuntimeError: CUDA out of memory. Tried to allocate 2 GiB" in message
    assert "--batch-size" in message
    _assert_stopped_then_rerun_completes(monkeypatch, tmp_path / "s", folder, 0, ref, excinfo)


def _decoder_that(action, image):
    """decode_image, except that it first calls `action` for the bytes of `image`; set before the
    decode workers fork, it is theirs too."""
    original, data = pipeline.decode_image, image.read_bytes()

    def decode(got, transform, min_size=2):
        if got == data:
            action()
        return original(got, transform, min_size)

    return decode


def test_a_decode_worker_killed_by_the_system_stops_the_harvest_and_a_rerun_completes(tmp_path, monkeypatch,
                                                                                      reference):
    folder, ref = reference
    # the worker that gets image 17 (shard 1) dies as an out-of-memory kill would
    monkeypatch.setattr(pipeline, "decode_image", _decoder_that(lambda: os.kill(os.getpid(), signal.SIGKILL),
                                                                folder / "img017.jpg"))
    with pytest.raises(HarvestError) as excinfo:
        harvest(_cfg(tmp_path / "s", folder, workers=2))
    assert "a decode worker process died" in str(excinfo.value) and "--workers" in str(excinfo.value)
    _assert_stopped_then_rerun_completes(monkeypatch, tmp_path / "s", folder, 2, ref, excinfo)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_decoder_that_raises_stops_the_harvest_and_a_rerun_completes(tmp_path, monkeypatch, reference, workers):
    folder, ref = reference

    def boom():
        raise ValueError("decoder bug")

    monkeypatch.setattr(pipeline, "decode_image", _decoder_that(boom, folder / "img015.jpg"))
    with pytest.raises(HarvestError) as excinfo:
        harvest(_cfg(tmp_path / "s", folder, workers))
    assert "reading or decoding its images failed: ValueError: decoder bug" in str(excinfo.value)
    _assert_stopped_then_rerun_completes(monkeypatch, tmp_path / "s", folder, workers, ref, excinfo)


def test_our_own_errors_come_through_as_they_are(tmp_path, monkeypatch, reference):
    folder, _ = reference
    own = NonFiniteActivationError("resid_1: activations of images ['img000.jpg'] are NaN/inf in fp16")
    _fail_on_call(monkeypatch, ShardWriter, "add", 1, own)
    with pytest.raises(NonFiniteActivationError) as excinfo:
        harvest(_cfg(tmp_path / "s", folder))
    assert excinfo.value is own
    assert [s.state for s in open_store(str(tmp_path / "s")).shards()] == ["writing", "planned", "planned"]


def test_the_cli_prints_a_pipeline_failure_as_one_line(tmp_path, monkeypatch, reference, capsys):
    folder, _ = reference
    _fail_on_call(monkeypatch, ShardWriter, "add", 2, OSError(errno.EROFS, "Read-only file system"))
    code = main(["harvest", "--images", str(folder), "--out", str(tmp_path / "s"), "--model", TINY, "--pretrained",
                 "none", "--layers", "1,3", "--batch-size", "2", "--workers", "0", "--chunk-images", "4",
                 "--region-images", "8", "--shard-size", "12", "--no-progress", "--report", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("actstore: error: harvest stopped on input shard ")
    assert "OSError: [Errno 30] Read-only file system" in err[0] and "Traceback" not in err[0]
