"""Reading whole chunks straight into a caller's buffer, without zarr's per-call overhead.

The format fixes the codec chain of every array to one of our presets (bytes -> [zstd | blosc] ->
crc32c), so a chunk object is `payload + crc32c(payload)` (4 bytes, little endian) and decodes with
the matching numcodecs codec. Reading it ourselves lets a reader reuse its buffers (no fresh 8 MiB
allocation and page faults per chunk), read uncompressed chunks from local disk with one `preadv`
straight into the destination, and decode in threads (numcodecs releases the GIL). Any other codec
chain (a store rewritten by other tools) makes `ChunkCodec` raise StoreFormatError; readers then go
through zarr instead."""

from __future__ import annotations

import os

import numcodecs
import numcodecs.blosc
import numpy as np
from crc32c import crc32c  # hardware crc32c that releases the GIL: ~20 GB/s a core, ~5 GB/s for zarr's

from activation_store.errors import ChunkCorruptError, ChunkMissingError, StoreFormatError

CRC_BYTES = 4
_CRC_MISMATCH = "crc32c checksum mismatch; run `actstore verify` to list every bad chunk"
_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


def crc_bytes(payload) -> bytes:
    """The checksum zarr's crc32c codec appends to `payload`: its CRC-32C, 4 bytes little endian."""
    return _crc_le(crc32c(payload))


def _crc_le(crc: int) -> bytes:
    """A CRC-32C value as the 4 stored bytes (little endian)."""
    return crc.to_bytes(CRC_BYTES, "little")


# Writes, and copies out of a GET's buffer, take their checksum a piece at a time, each piece right
# beside the copy that moves it (the pwrite; the copy into the window), so the piece is read from
# the core's cache, not from memory, the second time: 1 MiB fits a core's L2 cache; 256 KiB pieces
# measured slower (more calls). Measured with 4 threads on 2 cores (`benchmarks/chunk_checksum.py`,
# three runs): writes 1.02-1.13x, copies 1.14-1.18x; preads 0.97-1.05x, so they are not split.
PIECE = 1 << 20


class FramedPayload:
    """A chunk object to be: `payload + crc32c(payload)`. Written to a file descriptor, the checksum
    is computed a piece at a time just before the piece is written, so `pwrite` copies a piece still
    in the CPU's cache instead of reading the whole payload from memory a second time (see PIECE;
    0.78-0.86 of a plain pwrite with no checksum)."""

    def __init__(self, payload: np.ndarray) -> None:
        self.payload = payload.reshape(-1).view(np.uint8)

    def parts(self) -> list:
        """The object as buffers to write one after the other (its checksum computed now)."""
        return [self.payload, crc_bytes(self.payload)]

    def write_to(self, fd: int) -> None:
        """The whole object into `fd` from offset 0 (short writes finished)."""
        crc, off, n = 0, 0, self.payload.nbytes
        while off < n:
            piece = self.payload[off:off + PIECE]
            crc = crc32c(piece, crc)
            _pwrite_all(fd, piece, off)
            off += piece.nbytes
        _pwrite_all(fd, np.frombuffer(_crc_le(crc), np.uint8), n)


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    done = 0
    while done < data.nbytes:
        done += os.pwrite(fd, data[done:], offset + done)


def crc_matches(payload, stored_crc) -> bool:
    """Whether `stored_crc` (the 4 bytes after a chunk object's payload) is the checksum of
    `payload`. The package's one checksum check: readers, `pread` and `verify` all use it (a
    checksum computed piece by piece is compared by `crc_value_matches`)."""
    return crc_value_matches(crc32c(payload), stored_crc)


def crc_value_matches(crc: int, stored_crc) -> bool:
    """Whether `stored_crc` holds the CRC-32C value `crc`."""
    return len(stored_crc) == CRC_BYTES and _crc_le(crc) == bytes(stored_crc)


class ChunkCodec:
    """Encodes and decodes the chunk objects of one of our presets (see docs/format.md).

    Raises StoreFormatError for any other codec chain."""

    def __init__(self, codec_chain: list[dict]) -> None:
        names = [c.get("name") for c in codec_chain]
        if len(names) not in (2, 3) or names[0] != "bytes" or names[-1] != "crc32c":
            raise StoreFormatError(f"not an activation-store codec chain: {names}")
        self.compressor = names[1] if len(names) == 3 else None
        if self.compressor not in (None, "zstd", "blosc"):
            raise StoreFormatError(f"unsupported compressor {self.compressor!r} in codec chain {names}")
        self._zstd = self._blosc = None
        try:
            cfg = (codec_chain[1].get("configuration") or {}) if self.compressor else {}
            if self.compressor == "zstd":
                self._zstd = numcodecs.Zstd(level=cfg["level"])
            elif self.compressor == "blosc":
                self._blosc = numcodecs.Blosc(cname=cfg["cname"], clevel=cfg["clevel"], shuffle=_SHUFFLE[cfg["shuffle"]],
                                              blocksize=cfg.get("blocksize", 0))
                self._typesize = cfg["typesize"]
        except (KeyError, TypeError) as exc:
            raise StoreFormatError(f"codec chain {names}: configuration of {self.compressor} not understood ({exc!r})") from exc

    def encode(self, chunk: np.ndarray) -> list:
        """The stored object of a whole chunk, as buffers to write one after the other."""
        return self.framed(chunk).parts()

    def framed(self, chunk: np.ndarray) -> FramedPayload:
        """The stored object of a whole chunk, its checksum not yet computed (see FramedPayload)."""
        chunk = np.ascontiguousarray(chunk)
        if self.compressor is None:
            payload = chunk.reshape(-1).view(np.uint8)
        elif self.compressor == "zstd":
            payload = np.frombuffer(self._zstd.encode(chunk), np.uint8)
        else:
            if chunk.dtype.itemsize != self._typesize:
                raise StoreFormatError(f"blosc typesize {self._typesize} of the codec chain does not match dtype {chunk.dtype}")
            payload = np.frombuffer(self._blosc.encode(chunk), np.uint8)
        return FramedPayload(payload)

    @property
    def uncompressed(self) -> bool:
        return self.compressor is None

    def decode_into(self, data, out: np.ndarray, what: str) -> None:
        """`data`: the stored object's bytes; `out`: C-contiguous array of the chunk's full shape.
        Raises ChunkCorruptError when the checksum fails or the payload does not decode to `out`."""
        raw = np.frombuffer(data, dtype=np.uint8)
        payload = raw[:-CRC_BYTES]
        if self.compressor is None and payload.nbytes == out.nbytes:  # checked piece by piece as copied
            dst, crc = out.reshape(-1).view(np.uint8), 0
            for off in range(0, payload.nbytes, PIECE):
                crc = crc32c(payload[off:off + PIECE], crc)
                dst[off:off + PIECE] = payload[off:off + PIECE]
            if not crc_value_matches(crc, raw[-CRC_BYTES:]):
                raise ChunkCorruptError(f"{what}: {_CRC_MISMATCH}")
            return
        if not crc_matches(payload, raw[-CRC_BYTES:]):
            raise ChunkCorruptError(f"{what}: {_CRC_MISMATCH}")
        if self.compressor is None:
            raise ChunkCorruptError(f"{what}: does not decode ({payload.nbytes} bytes, expected {out.nbytes})")
        try:
            if self.compressor == "zstd":
                self._zstd.decode(payload, out=out)
            else:
                numcodecs.blosc.decompress(payload, out)
        except Exception as exc:  # a checksum-valid object that does not decode: written by something else
            raise ChunkCorruptError(f"{what}: does not decode ({exc})") from exc

    def pread_uncompressed(self, path: str, out: np.ndarray, what: str) -> None:
        """Local, uncompressed: one preadv straight into `out`, then the checksum (a preadv and a
        checksum per PIECE measured no faster; see PIECE)."""
        crc = bytearray(CRC_BYTES)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise ChunkMissingError(f"{what} is missing from storage; run `actstore verify`") from exc
        try:
            size = os.fstat(fd).st_size
            if size != out.nbytes + CRC_BYTES:
                raise ChunkCorruptError(f"{what}: {size} bytes on disk, expected {out.nbytes + CRC_BYTES}")
            os.preadv(fd, [out.reshape(-1).view(np.uint8), crc], 0)
        finally:
            os.close(fd)
        if not crc_matches(out.reshape(-1).view(np.uint8), crc):
            raise ChunkCorruptError(f"{what}: {_CRC_MISMATCH}")
