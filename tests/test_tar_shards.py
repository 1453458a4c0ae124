"""The one tar reader: webdataset grouping, truncated tars, one sample by key, brace expansion."""

import gzip
import io
import subprocess
import sys
import tarfile

import fsspec
import pytest

from activation_store.errors import ConfigError
from activation_store.tar_shards import TarSamples, expand_braces, image_of, read_sample, split_key
from harvest_helpers import write_tar

SAMPLES = [(f"{i:03d}", {"jpg": bytes([i]) * 700, "txt": b"caption %d" % i}) for i in range(4)]


def tar_bytes(samples=SAMPLES) -> bytes:
    buf = io.BytesIO()
    write_tar(buf, samples)
    return buf.getvalue()


def read_all(source, **kw):
    tar = TarSamples(source, **kw)
    return [(s.key, s.files) for s in tar], tar.truncated


def test_members_are_grouped_into_samples_by_key(tmp_path):
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w") as tar:
        d = tarfile.TarInfo("sub")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)  # not a file: skipped
        for name, data in [("sub/000.JPG", b"a"), ("sub/000.seg.png", b"b"), ("sub/000.json", b"{}"),
                           ("sub/001.jpg", b"c"), ("002.txt", b"d")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples, truncated = read_all(str(path))
    assert truncated is None
    assert samples == [("sub/000", {"jpg": b"a", "seg.png": b"b", "json": b"{}"}), ("sub/001", {"jpg": b"c"}),
                       ("002", {"txt": b"d"})]
    assert split_key("a.b/c.D.E") == ("a.b/c", "d.e")
    assert image_of(samples[0][1]) == b"a" and image_of(samples[2][1]) is None


def test_any_fsspec_url_a_file_object_and_a_compressed_tar_read_alike(tmp_path):
    raw = tar_bytes()
    want = [(k, f) for k, f in SAMPLES]
    (tmp_path / "a.tar").write_bytes(raw)
    assert read_all(tmp_path / "a.tar") == (want, None)
    assert read_all(f"file://{tmp_path / 'a.tar'}") == (want, None)
    assert read_all(io.BytesIO(raw)) == (want, None)
    assert read_all(io.BytesIO(gzip.compress(raw))) == (want, None)
    with fsspec.open("memory://shards/a.tar", "wb") as f:
        f.write(raw)
    assert read_all("memory://shards/a.tar") == (want, None)
    keys = [s.key for s in TarSamples(io.BytesIO(raw), keys_only=True)]
    assert keys == ["000", "001", "002", "003"]
    assert all(not s.files for s in TarSamples(io.BytesIO(raw), keys_only=True))


def test_a_truncated_tar_yields_what_it_holds_then_says_so():
    raw = tar_bytes()
    members = tarfile.open(fileobj=io.BytesIO(raw)).getmembers()
    in_data = members[5].offset_data + 100  # inside 002.txt: 002 is lost, 000 and 001 come through
    at_boundary = members[6].offset  # right after 002.txt, before 003.jpg: no end-of-archive blocks
    for cut, n_kept in [(in_data, 2), (at_boundary, 2), (members[6].offset + 100, 2)]:
        for keys_only in (False, True):
            tar = TarSamples(io.BytesIO(raw[:cut]), keys_only=keys_only)
            keys = [s.key for s in tar]
            assert keys == [k for k, _ in SAMPLES[:n_kept]], (cut, keys_only)
            assert tar.truncated and tar.truncated.startswith("ReadError"), tar.truncated
    samples, truncated = read_all(io.BytesIO(raw[:in_data]))
    assert truncated == "ReadError: unexpected end of data"
    assert samples == [(k, f) for k, f in SAMPLES[:2]]  # the complete samples keep every file
    assert read_all(io.BytesIO(b"")) == ([], "ReadError: empty file")
    assert read_all(io.BytesIO(b"not a tar at all" * 100))[1].startswith("ReadError")
    # a whole tar read again after a truncated one: the flag is per iteration
    tar = TarSamples(io.BytesIO(raw))
    assert len(list(tar)) == 4 and tar.truncated is None


def test_a_repeated_key_or_file_is_a_later_occurrence_never_merged_into_the_first():
    # a.jpg b.jpg a.jpg (the key comes back), c.jpg c.txt c.jpg (a second jpg in one sample), d.jpg
    raw = tar_bytes([("a", {"jpg": b"a1"}), ("b", {"jpg": b"b1"}), ("a", {"jpg": b"a2", "txt": b"x"}),
                     ("c", {"jpg": b"c1", "txt": b"t"}), ("c", {"jpg": b"c2"}), ("d", {"jpg": b"d1"})])
    want = [("a", {"jpg": b"a1"}), ("b", {"jpg": b"b1"}), ("c", {"jpg": b"c1", "txt": b"t"}), ("d", {"jpg": b"d1"})]
    assert read_all(io.BytesIO(raw)) == (want, None)  # by default the first occurrences only
    assert [s.key for s in TarSamples(io.BytesIO(raw), keys_only=True)] == ["a", "b", "c", "d"]
    for keys_only in (False, True):
        got = [(s.key, s.duplicate) for s in TarSamples(io.BytesIO(raw), keys_only=keys_only, duplicates=True)]
        assert [k for k, _ in got] == ["a", "b", "a", "c", "c", "d"]
        (_, again), (_, second) = got[2], got[4]
        assert again.startswith("key 'a' comes back after other samples at tar member 'a.jpg' (offset 2048)")
        assert second.startswith("key 'c' has a second 'jpg' file at tar member 'c.jpg' (offset 6144)")
        assert "this later one is dropped" in second and [d for _, d in got if d] == [again, second]
    assert read_sample(io.BytesIO(raw), "a") == {"jpg": b"a1"}  # the first occurrence, as the harvest stored it


def test_read_sample_finds_one_sample_by_key(tmp_path):
    path = tmp_path / "data-000.tar"
    write_tar(path, SAMPLES)
    assert read_sample(str(path), "002") == {"jpg": bytes([2]) * 700, "txt": b"caption 2"}
    assert read_sample(f"file://{path}", "000") == dict(SAMPLES[0][1])
    assert read_sample(str(path), "no-such-key") is None
    raw = path.read_bytes()
    members = tarfile.open(path).getmembers()
    assert read_sample(io.BytesIO(raw[:members[5].offset_data + 100]), "003") is None  # lost with the cut
    assert read_sample(io.BytesIO(raw[:members[5].offset_data + 100]), "001") == dict(SAMPLES[1][1])
    with pytest.raises(FileNotFoundError):
        read_sample(str(tmp_path / "missing.tar"), "000")


@pytest.mark.parametrize("pattern, names", [
    ("plain.tar", ["plain.tar"]),
    ("shard-{000..003}.tar", ["shard-000.tar", "shard-001.tar", "shard-002.tar", "shard-003.tar"]),
    ("s3://b/p-{0009..0011}.tar", ["s3://b/p-0009.tar", "s3://b/p-0010.tar", "s3://b/p-0011.tar"]),
    ("{8..10}", ["8", "9", "10"]),
    ("{a,b}-{00..01}", ["a-00", "a-01", "b-00", "b-01"]),
    ("x{b,c{d,e}}y", ["xby", "xcdy", "xcey"]),
    ("d/{train,val}/{0..1}.tar", ["d/train/0.tar", "d/train/1.tar", "d/val/0.tar", "d/val/1.tar"]),
])
def test_brace_expansion(pattern, names):
    assert expand_braces(pattern) == names


def test_unbalanced_braces_are_a_config_error():
    with pytest.raises(ConfigError, match="shard-{000..003.tar"):
        expand_braces("shard-{000..003.tar")


def test_tar_shards_imports_neither_torch_nor_webdataset_nor_the_harvest():
    code = ("import sys, activation_store.tar_shards\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip', 'webdataset') "
            "or m.startswith('activation_store.harvest')]\n"
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
