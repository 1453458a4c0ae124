"""The image metadata table: one row per input image, stored or not, so every stored row can be
traced back to its image and every dropped image to its reason."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq

OK = "ok"

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("source_shard", pa.string()),
        ("source_row", pa.int64()),
        ("row", pa.int64()),  # row in every location's array; -1 when not stored
        ("status", pa.string()),  # "ok" or the reason the image was dropped
        ("error", pa.string()),
    ]
)


@dataclass
class ImageRecord:
    key: str
    url: str | None = None
    caption: str | None = None
    width: int | None = None
    height: int | None = None
    source_shard: str | None = None
    source_row: int | None = None
    status: str = OK
    error: str | None = None


def to_parquet_bytes(records: list[ImageRecord], rows: list[int]) -> bytes:
    cols = {name: [] for name in SCHEMA.names}
    for rec, row in zip(records, rows, strict=True):
        d = asdict(rec)
        d["row"] = row
        for name in SCHEMA.names:
            cols[name].append(d[name])
    table = pa.Table.from_arrays([pa.array(cols[f.name], type=f.type) for f in SCHEMA], schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def from_parquet_bytes(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))
