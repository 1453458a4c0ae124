"""Image bytes -> preprocessed uint8 pixels, or the reason they cannot be.

Runs in decode worker processes. Bad input is never fatal: every failure becomes a status that
the harvest counts and records in the image-metadata table."""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from activation_store.harvest.model import preprocess_pil

# statuses of dropped images (the image table's `status`); "ok" means stored
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated_image"
DECODE_ERROR = "decode_error"
DECOMPRESSION_BOMB = "decompression_bomb"
TOO_SMALL = "too_small"
MISSING = "missing_image"
TRUNCATED_TAR = "truncated_tar"
DOWNLOAD_ERROR = "download_error"
NONFINITE = "nonfinite_activation"  # set by the pipeline, after the forward
UNREADABLE = "unreadable_file"  # a folder's file (or directory) that cannot be read
NOT_A_FILE = "not_a_file"  # a folder's FIFO, socket, device, or a directory named like an image: never opened
OUTSIDE_FOLDER = "outside_folder"  # a folder's symbolic link that leaves the folder (--follow-external-symlinks)
DUPLICATE_KEY = "duplicate_key"  # a tar's key seen before, or a sample's second file of one kind: the later one
REFUSED_URL = "refused_url"  # a URL list's entry that is not downloaded: not http(s), or a private address


def _message(exc: BaseException) -> str:
    # Pillow names the in-memory file object, with its address: keep messages reproducible
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))


@dataclass
class Decoded:
    pixels: np.ndarray | None  # (H, W, 3) uint8, None when dropped
    status: str  # "ok" or a reason
    error: str | None = None
    width: int | None = None
    height: int | None = None
    converted_from: str | None = None  # original mode when not RGB


def decode_image(data: bytes | None, transform, min_size: int = 2) -> Decoded:
    """`transform` is the model's (`LoadedViT.transform`): an open_clip eval transform or a
    ClipScopeTransform (harvest/preprocess.py)."""
    if data is None:
        return Decoded(None, MISSING, "no image in this sample")
    try:
        with warnings.catch_warnings():
            # Pillow warns between 1x and 2x its pixel limit and raises above 2x: both are bombs to us
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return Decoded(None, DECOMPRESSION_BOMB, _message(exc))
    except UnidentifiedImageError as exc:
        return Decoded(None, NOT_AN_IMAGE, _message(exc))
    except OSError as exc:
        status = TRUNCATED if "truncated" in str(exc).lower() else DECODE_ERROR
        return Decoded(None, status, _message(exc))
    except Exception as exc:  # Pillow raises a zoo of types on malformed files
        return Decoded(None, DECODE_ERROR, f"{type(exc).__name__}: {_message(exc)}")
    if min(width, height) < min_size:
        return Decoded(None, TOO_SMALL, f"{width}x{height} is smaller than {min_size} px", width, height)
    mode = img.mode
    try:
        # the preset's order: open_clip resizes, crops, then converts to RGB; clipscope (HF) converts first
        pixels = preprocess_pil(transform, img)
    except Exception:
        try:  # open_clip: modes Pillow cannot resize as they are (some 16-bit and palette images): convert first
            pixels = preprocess_pil(transform, img.convert("RGB"))
        except Exception as exc:
            return Decoded(None, DECODE_ERROR, f"preprocessing failed: {type(exc).__name__}: {exc}", width, height)
    return Decoded(pixels, "ok", None, width, height, None if mode == "RGB" else mode)
