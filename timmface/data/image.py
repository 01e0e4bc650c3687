"""Encoded image bytes -> ``uint8`` RGB pixels: every reader's decoder, and the size checks before it.

* :func:`decode_image_bytes` decodes JPEG/PNG/GIF/WebP with a :class:`~timmface.errors.CorruptRecordError`
  that names the file and key; the datasets (RecordIO, image folders, ``.bin`` sets, WebDataset) call it.
* :func:`decode_rgb` gives the same pixels on the training hot path: JPEGs go straight to torchvision's
  libjpeg-turbo op, and failures raise a bare ``RuntimeError`` so that the caller asks its dataset for
  the error message that names the record.
* :func:`image_size_from_header` / :func:`jpeg_size` read an image's size from its header without decoding;
  :func:`check_image_size` uses it to refuse decompression bombs (``MAX_IMAGE_PIXELS``) before any allocation.
* :func:`resize_uint8`: the one resize (antialiased bilinear) applied to images that are not ``image_size``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from timmface.errors import CorruptRecordError

__all__ = [
    "MAX_IMAGE_PIXELS",
    "check_image_size",
    "decode_image_bytes",
    "decode_rgb",
    "image_size_from_header",
    "is_jpeg",
    "jpeg_size",
    "resize_uint8",
]

# Refuse to decode images of more pixels than this (PIL's default MAX_IMAGE_PIXELS, ~0.25 GiB as RGB): the
# decoders allocate height x width x 3 bytes from the header's size fields before reading a single pixel, so a
# 2 kB file that claims 60000x60000 would ask for 10.8 GB.
MAX_IMAGE_PIXELS = 89_478_485


# --------------------------------------------------------------------------------------------------
# Sizes from headers
# --------------------------------------------------------------------------------------------------


def image_size_from_header(data: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """``(height, width)`` from the header of a JPEG, PNG, GIF or WebP, without decoding; None if unknown.

    Only the few bytes the formats define are read (JPEG: the first SOF marker; PNG: IHDR; GIF: the
    logical screen; WebP: the VP8 / VP8L / VP8X header).
    """
    head = bytes(data[:32])
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and len(head) >= 24:
        w, h = struct.unpack_from(">II", head, 16)
        return h, w
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        w, h = struct.unpack_from("<HH", head, 6)
        return h, w
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
        chunk = head[12:16]
        if chunk == b"VP8X":  # 24-bit canvas width - 1 and height - 1
            return int.from_bytes(head[27:30], "little") + 1, int.from_bytes(head[24:27], "little") + 1
        if chunk == b"VP8L":  # 14-bit width - 1, 14-bit height - 1
            bits = int.from_bytes(head[21:25], "little")
            return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
        if chunk == b"VP8 ":  # 14-bit width and height after the key-frame start code
            w, h = struct.unpack_from("<HH", head, 26)
            return h & 0x3FFF, w & 0x3FFF
        return None
    return jpeg_size(data)


# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): they carry the size.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_size(data: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """``(height, width)`` from a JPEG's first start-of-frame segment without decoding; None if not a JPEG
    or if the markers end (end of image, start of scan, end of data) before a frame header."""
    view = memoryview(data)
    if bytes(view[:2]) != b"\xff\xd8":
        return None
    pos, n = 2, len(view)
    while pos + 4 <= n:
        if view[pos] != 0xFF:
            return None
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        if marker in _SOF:
            return struct.unpack_from(">HH", view, pos + 5) if pos + 9 <= n else None
        (length,) = struct.unpack_from(">H", view, pos + 2)
        pos += 2 + length
    return None


def check_image_size(data: bytes | bytearray | memoryview, key: int | str | None, source: str) -> None:
    """Raise :class:`CorruptRecordError` when the image header claims more than ``MAX_IMAGE_PIXELS`` pixels."""
    size = image_size_from_header(data)
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise CorruptRecordError(
            f"{source}: key {key}: image header claims {size[0]}x{size[1]} pixels; decoding would need "
            f"{3 * size[0] * size[1] / 2**30:.1f} GiB (more than MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS})",
            key=key,
        )


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


def decode_image_bytes(
    data: bytes | bytearray | memoryview, key: int | str | None = None, source: str = ""
) -> torch.Tensor:
    """Decode JPEG/PNG bytes to a ``uint8`` RGB tensor of shape (3, H, W), grayscale included.

    Raises :class:`CorruptRecordError` naming ``source`` and ``key`` when the bytes are not an image.
    """
    from torchvision.io import ImageReadMode, decode_image

    if len(data) == 0:
        raise CorruptRecordError(f"{source}: key {key}: empty image", key=key)
    check_image_size(data, key, source)
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        reason = " ".join(str(e).split(",")[-1].split())  # torchvision prefixes the C++ source location
        raise CorruptRecordError(f"{source}: key {key}: cannot decode image: {reason}", key=key) from None


_JPEG_SOI = b"\xff\xd8\xff"
_jpeg_op: tuple[Callable[..., Tensor] | None, int] | None = None


def _find_jpeg_op() -> tuple[Callable[..., Tensor] | None, int]:
    """torchvision's C++ JPEG decoder and its RGB mode, looked up once (importing torchvision.io is not
    cheap). The public ``decode_jpeg`` wraps the op with per-call API-usage logging and a
    DeprecationWarning: ~7 µs of a ~90 µs 112x112 decode (measured on this project's CPU)."""
    global _jpeg_op
    if _jpeg_op is None:
        from torchvision.io import ImageReadMode  # also registers the image ops

        try:
            _jpeg_op = (torch.ops.image.decode_jpeg, ImageReadMode.RGB.value)
        except (AttributeError, RuntimeError):  # a torchvision built without image ops
            _jpeg_op = (None, ImageReadMode.RGB.value)
    return _jpeg_op


def is_jpeg(data: bytes | bytearray | memoryview) -> bool:
    return bytes(data[:3]) == _JPEG_SOI


def decode_rgb(data: bytes | bytearray | memoryview | Tensor) -> Tensor:
    """Encoded image (bytes, or a uint8 CPU tensor) -> ``uint8`` RGB ``3 x H x W`` (for JPEGs a view of
    ``H x W x 3`` memory).

    The same pixels as :func:`decode_image_bytes` (``decode_image`` in RGB mode
    sends JPEGs to the same libjpeg-turbo call). Raises ``RuntimeError`` on bad bytes without composing
    a message: callers ask the dataset for its own error, which names the record.
    """
    if len(data) == 0:
        raise RuntimeError("empty image")
    if isinstance(data, Tensor):
        raw, head = data, bytes(data[:3].tolist())
    else:
        raw, head = torch.frombuffer(bytearray(data), dtype=torch.uint8), bytes(data[:3])
    op, rgb = _jpeg_op if _jpeg_op is not None else _find_jpeg_op()
    if op is not None and head == _JPEG_SOI:
        return op(raw, rgb, False)
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(raw, mode=ImageReadMode.RGB)


def resize_uint8(image: Tensor, size: int) -> Tensor:
    out = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)
