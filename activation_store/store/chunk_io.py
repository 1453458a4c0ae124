"""Reading whole chunks straight into a caller's buffer, without zarr's per-call overhead.

The format fixes the codec chain of every array to one of our presets (bytes -> [zstd | blosc] ->
crc32c), so a chunk object is `payload + crc32c(payload)` (4 bytes, little endian) and decodes with
the matching numcodecs codec. Reading it ourselves lets a reader reuse its buffers (no fresh 8 MiB
allocation and page faults per chunk), read uncompressed chunks from local disk with one `preadv`
straight into the destination, and decode in threads (numcodecs releases the GIL). Any other codec
chain (a store rewritten by other tools) goes through zarr instead."""

from __future__ import annotations

import os

import numcodecs
import numcodecs.blosc
import numpy as np

from activation_store.errors import ChunkCorruptError, ChunkMissingError


try:  # hardware crc32c that releases the GIL: ~20 GB/s a core here, against ~5 GB/s under the GIL
    from crc32c import crc32c as _crc32c_fast
except ImportError:  # pragma: no cover - crc32c is a dependency; google_crc32c comes with zarr
    _crc32c_fast = None


def crc_of(buf: np.ndarray) -> int:
    if _crc32c_fast is not None:
        return _crc32c_fast(buf)
    import google_crc32c

    ro = buf.view()
    ro.flags.writeable = False  # google_crc32c takes read-only buffers only
    return google_crc32c.value(ro)


class ChunkCodec:
    """Encodes and decodes the chunk objects of one of our presets (see docs/format.md)."""

    def __init__(self, codec_chain: list[dict]) -> None:
        names = [c["name"] for c in codec_chain]
        if names[0] != "bytes" or names[-1] != "crc32c" or len(names) > 3:
            raise ValueError(f"not an activation-store codec chain: {names}")
        self.compressor = names[1] if len(names) == 3 else None
        if self.compressor not in (None, "zstd", "blosc"):
            raise ValueError(f"unsupported compressor {self.compressor}")
        self._zstd = numcodecs.Zstd(level=codec_chain[1]["configuration"]["level"]) if self.compressor == "zstd" else None
        if self.compressor == "blosc":
            cfg = codec_chain[1]["configuration"]
            shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[cfg["shuffle"]]
            self._blosc = numcodecs.Blosc(cname=cfg["cname"], clevel=cfg["clevel"], shuffle=shuffle,
                                          blocksize=cfg.get("blocksize", 0))
            self._typesize = cfg["typesize"]

    def encode(self, chunk: np.ndarray) -> list:
        """The stored object of a whole chunk, as buffers to write one after the other."""
        chunk = np.ascontiguousarray(chunk)
        if self.compressor is None:
            payload = chunk.reshape(-1).view(np.uint8)
        elif self.compressor == "zstd":
            payload = np.frombuffer(self._zstd.encode(chunk), np.uint8)
        else:
            if chunk.dtype.itemsize != self._typesize:
                raise ValueError(f"blosc typesize {self._typesize} does not match dtype {chunk.dtype}")
            payload = np.frombuffer(self._blosc.encode(chunk), np.uint8)
        return [payload, crc_of(payload).to_bytes(4, "little")]

    @property
    def uncompressed(self) -> bool:
        return self.compressor is None

    def decode_into(self, data, out: np.ndarray, what: str) -> None:
        """`data`: the stored object's bytes; `out`: C-contiguous array of the chunk's full shape."""
        raw = np.frombuffer(data, dtype=np.uint8)
        payload, stored_crc = raw[:-4], int.from_bytes(raw[-4:].tobytes(), "little")
        if crc_of(payload) != stored_crc:
            raise ChunkCorruptError(f"{what}: crc32c checksum mismatch; run `actstore verify` to list every bad chunk")
        try:
            if self.compressor is None:
                if payload.nbytes != out.nbytes:
                    raise ValueError(f"{payload.nbytes} bytes, expected {out.nbytes}")
                out.reshape(-1).view(np.uint8)[:] = payload
            elif self.compressor == "zstd":
                self._zstd.decode(payload, out=out)
            else:
                numcodecs.blosc.decompress(payload, out)
        except ChunkCorruptError:
            raise
        except Exception as exc:  # a checksum-valid object that does not decode: written by something else
            raise ChunkCorruptError(f"{what}: does not decode ({exc})") from exc

    def pread_uncompressed(self, path: str, out: np.ndarray, what: str) -> None:
        """Local, uncompressed: one preadv straight into `out`, then the checksum."""
        crc = bytearray(4)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise ChunkMissingError(f"{what} is missing from storage; run `actstore verify`") from exc
        try:
            size = os.fstat(fd).st_size
            if size != out.nbytes + 4:
                raise ChunkCorruptError(f"{what}: {size} bytes on disk, expected {out.nbytes + 4}")
            os.preadv(fd, [out.reshape(-1).view(np.uint8), crc], 0)
        finally:
            os.close(fd)
        if crc_of(out.reshape(-1).view(np.uint8)) != int.from_bytes(crc, "little"):
            raise ChunkCorruptError(f"{what}: crc32c checksum mismatch; run `actstore verify` to list every bad chunk")
