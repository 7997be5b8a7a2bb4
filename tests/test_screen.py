"""The screenshot judge: a PNG reader that undoes every PNG filter."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from imagesmith.inspect.screen import distinct_colours, png_pixels


def paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def encode_png(width: int, height: int, pixels: bytes) -> bytes:
    """An RGB PNG whose rows use filters 0 to 4 in turn."""
    stride, raw, previous = width * 3, bytearray(), bytes(width * 3)
    for y in range(height):
        row = pixels[y * stride : (y + 1) * stride]
        kind = y % 5
        out = bytearray()
        for i, value in enumerate(row):
            left = row[i - 3] if i >= 3 else 0
            up, corner = previous[i], previous[i - 3] if i >= 3 else 0
            predictor = (0, left, up, (left + up) // 2, paeth(left, up, corner))[kind]
            out.append((value - predictor) & 0xFF)
        raw += bytes([kind]) + out
        previous = row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(raw)))
        + chunk(b"IEND", b"")
    )  # fmt: skip


def test_every_filter_is_undone(tmp_path: Path) -> None:
    width, height = 17, 11
    pixels = bytes(
        (x * 37 + y * 91 + c * 53) % 256
        for y in range(height)
        for x in range(width)
        for c in range(3)
    )
    png = tmp_path / "screen.png"
    png.write_bytes(encode_png(width, height, pixels))
    assert png_pixels(png.read_bytes()) == (width, height, 3, pixels)
    assert distinct_colours(png) == len({pixels[i : i + 3] for i in range(0, len(pixels), 3)})


def test_a_flat_screen_has_one_colour(tmp_path: Path) -> None:
    png = tmp_path / "blank.png"
    png.write_bytes(encode_png(64, 48, bytes([0, 0, 170]) * 64 * 48))
    assert distinct_colours(png) == 1


def test_not_a_png_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "x.png"
    bad.write_bytes(b"P6\n1 1\n255\n\x00\x00\x00")
    with pytest.raises(ValueError, match="not a PNG"):
        png_pixels(bad.read_bytes())
