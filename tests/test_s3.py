"""The same create / write / read / verify / info cycle against an S3 server on 127.0.0.1 (moto)."""

import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from activation_store.cli import main
from activation_store.store import open_store
from store_helpers import make_store, write_shard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_store_cycle_on_s3(s3, capsys):
    opts = {"endpoint_url": s3}
    url = "s3://acts/run1/store.zarr"
    store = make_store(url, storage_options=opts, codec="shuffle-zstd")
    store.plan_shards([("a", 9), ("b", 5)])
    a = write_shard(store, "a", 0, 9, dropped=1)
    b = write_shard(store, "b", 1, 5)

    s = open_store(url, storage_options=opts)
    assert s.n_images == 14
    np.testing.assert_array_equal(s.read_rows("resid_2", 0, 9, raw=True), a["resid_2"].astype(np.float16))
    np.testing.assert_array_equal(s.read_cls("resid_5", 16, 21), b["resid_5"][:, 0].astype(np.float16).astype(np.float32))
    assert s.images(include_dropped=True).num_rows == 15

    assert main(["verify", url, "--endpoint-url", s3, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["info", url, "--endpoint-url", s3, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["images"] == 14 and d["shards"]["committed"] == 2
    assert d["per_location"]["resid_2"]["committed_chunks"] == 5

    # a fresh process reads it back through plain zarr + s3fs
    code = f"""
import zarr, numpy as np
g = zarr.open_group({url!r}, mode="r", storage_options={{"endpoint_url": {s3!r}}})
print(float(np.asarray(g["resid_2"][0:9]).astype("f8").sum()))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert float(out) == pytest.approx(a["resid_2"].astype(np.float16).astype(np.float64).sum())

    # damage one chunk object: verify names it
    import boto3

    client = boto3.client("s3", endpoint_url=s3)
    key = "run1/store.zarr/resid_5/c/1/0/0"
    body = bytearray(client.get_object(Bucket="acts", Key=key)["Body"].read())
    body[20] ^= 0xFF
    client.put_object(Bucket="acts", Key=key, Body=bytes(body))
    assert main(["verify", url, "--endpoint-url", s3, "--quiet"]) == 1
    assert "resid_5/c/1/0/0" in capsys.readouterr().out


def test_create_refuses_a_prefix_holding_foreign_objects_and_deletes_nothing(s3):
    import boto3

    from activation_store.errors import StoreExistsError, StoreNotEmptyError

    client = boto3.client("s3", endpoint_url=s3)
    client.put_object(Bucket="acts", Key="mine/notes.txt", Body=b"my notes")
    with pytest.raises(StoreNotEmptyError, match=r"s3://acts/mine is not empty and is not an activation store.*'notes.txt'"):
        make_store("s3://acts/mine", storage_options={"endpoint_url": s3})
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="acts", Prefix="mine/").get("Contents", [])]
    assert keys == ["mine/notes.txt"]  # nothing deleted, nothing written
    store = make_store("s3://acts/fresh", storage_options={"endpoint_url": s3})
    assert store.locations == ["resid_2", "resid_5"]
    with pytest.raises(StoreExistsError):
        make_store("s3://acts/fresh", storage_options={"endpoint_url": s3})


def test_claims_on_s3_use_conditional_puts(s3):
    import boto3

    from activation_store.errors import ShardClaimedError

    opts = {"endpoint_url": s3}
    store = make_store("s3://acts/claims", storage_options=opts)
    store.plan_shards([("a", 5), ("b", 5)])
    client = boto3.client("s3", endpoint_url=s3)
    claim_a, claim_b = "claims/shards/s000000/writer.claim", "claims/shards/s000001/writer.claim"

    w = store.writer("a")
    assert json.loads(client.get_object(Bucket="acts", Key=claim_a)["Body"].read())["token"] == w._claim.token
    with pytest.raises(ShardClaimedError, match=r"input shard 'a' \(s000000\).*holds it since"):
        open_store("s3://acts/claims", storage_options=opts).writer("a")
    w.close()
    assert "Contents" not in client.list_objects_v2(Bucket="acts", Prefix=claim_a)
    write_shard(open_store("s3://acts/claims", storage_options=opts), "a", 0, 5)

    def fake(refreshed_unix):
        doc = {"token": "f" * 32, "pid": 1, "host": "gpu-node-7", "machine": "elsewhere", "claimed_at": "earlier",
               "refreshed_at": "earlier", "refreshed_unix": refreshed_unix, "timeout_s": 3600.0}
        client.put_object(Bucket="acts", Key=claim_b, Body=json.dumps(doc).encode())

    fake(time.time())
    with pytest.raises(ShardClaimedError, match="gpu-node-7"):
        store.writer("b")
    fake(time.time() - 7200)  # its lease ran out: taken over with If-Match on the stale claim's ETag
    write_shard(open_store("s3://acts/claims", storage_options=opts), "b", 1, 5)
    s = open_store("s3://acts/claims", storage_options=opts)
    assert s.n_images == 10 and "Contents" not in client.list_objects_v2(Bucket="acts", Prefix=claim_b)
