"""The same create / write / read / verify / info cycle against an S3 server on 127.0.0.1 (moto)."""

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from activation_store.cli import main
from activation_store.store import open_store
from store_helpers import make_store, write_shard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(monkeypatch):
    from moto.server import ThreadedMotoServer
    import boto3

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "NO_PROXY": "127.0.0.1,localhost"}.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="acts")
    try:
        yield endpoint
    finally:
        server.stop()


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
