"""The image metadata table: one row per input image, stored or not, so every stored row can be
traced back to its image and every dropped image to its reason.

Names that are not valid UTF-8 (file names with other bytes, which Python holds as surrogate
escapes such as '\\udcff') cannot be parquet strings. Such a row is stored percent-encoded: in each
of its string values every byte that is not valid UTF-8 is written `%XX` and `%` itself `%25`, and
its `percent_encoded` is true (docs/format.md). `decode_name` gives the original bytes back."""

from __future__ import annotations

import io
from dataclasses import dataclass, fields
from urllib.parse import unquote_to_bytes

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
        ("percent_encoded", pa.bool_()),  # format 1.1: the row's strings are percent-encoded
        # format 1.1: where the image's bytes live, so they can be shown again (report grids)
        ("data_url", pa.string()),  # the image file, or the tar holding it (absolute path or URL)
        ("data_offset", pa.int64()),  # offset of the bytes in data_url; -1: the whole file
        ("data_size", pa.int64()),  # their length; -1: the whole file
    ]
)
# columns a 1.0 table lacks, and the value they read as
_ADDED_IN_1_1 = {"percent_encoded": (pa.bool_(), False), "data_url": (pa.string(), None),
                 "data_offset": (pa.int64(), -1), "data_size": (pa.int64(), -1)}
STRING_COLUMNS = tuple(f.name for f in SCHEMA if f.type == pa.string())


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
    data_url: str | None = None
    data_offset: int = -1
    data_size: int = -1


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def percent_encode(text: str) -> str:
    """`text` with every character that is not valid UTF-8 written as the `%XX` of its bytes (a
    surrogate escape as the byte it stands for), and `%` as `%25`."""
    out = []
    for ch in text:
        if ch == "%":
            out.append("%25")
        elif "\ud800" <= ch <= "\udfff":
            raw = ch.encode("utf-8", "surrogateescape") if "\udc80" <= ch <= "\udcff" else ch.encode("utf-8", "surrogatepass")
            out.append("".join(f"%{b:02X}" for b in raw))
        else:
            out.append(ch)
    return "".join(out)


def decode_name(text: str) -> bytes:
    """The original bytes of a percent-encoded value (a row whose `percent_encoded` is true)."""
    return unquote_to_bytes(text)


def decode_text(text: str) -> str:
    """The original Python string (with its surrogate escapes) of a percent-encoded value."""
    return decode_name(text).decode("utf-8", "surrogateescape")


def to_parquet_bytes(records: list[ImageRecord], rows: list[int]) -> bytes:
    cols = {name: [] for name in SCHEMA.names}
    names = [f.name for f in fields(ImageRecord)]
    for rec, row in zip(records, rows, strict=True):
        d = {name: getattr(rec, name) for name in names}  # its values are str/int/None: asdict's deep copy cost 160 us an image
        d["row"] = row
        d["percent_encoded"] = not all(_is_utf8(d[c]) for c in STRING_COLUMNS if d[c] is not None)
        if d["percent_encoded"]:
            for c in STRING_COLUMNS:
                if d[c] is not None:
                    d[c] = percent_encode(d[c])
        for name in SCHEMA.names:
            cols[name].append(d[name])
    table = pa.Table.from_arrays([pa.array(cols[f.name], type=f.type) for f in SCHEMA], schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def from_parquet_bytes(data: bytes) -> pa.Table:
    """The table of one images.parquet, in the current schema: a table of format 1.0 gets the
    columns 1.1 added (`percent_encoded` false: its writers could not store names that are not
    UTF-8; no data location)."""
    table = pq.read_table(io.BytesIO(data))
    for name, (kind, value) in _ADDED_IN_1_1.items():
        if name not in table.column_names:
            table = table.append_column(name, pa.array([value] * table.num_rows, kind))
    return table.select(SCHEMA.names)
