"""The guest's screen: QEMU's monitor photographs it, and we judge the photo.

`screendump()` asks a running QEMU, over its QMP socket, for a PNG of the
display. `distinct_colours()` reads that PNG (stdlib only: zlib and the PNG
filters) and counts its colours: a greeter has hundreds, a blank or
text-only screen a handful.
"""

from __future__ import annotations

import json
import socket
import struct
import time
import zlib
from pathlib import Path

from imagesmith.errors import TestFailure

# Fewer colours than this is a blank screen, a console or a failed greeter.
MIN_COLOURS = 64


def qmp(sock: socket.socket, command: str, **arguments: object) -> dict[str, object]:
    """Send one QMP command and return its reply (events are skipped)."""
    message: dict[str, object] = {"execute": command}
    if arguments:
        message["arguments"] = arguments
    sock.sendall(json.dumps(message).encode() + b"\n")
    buffer = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise TestFailure(f"QEMU closed its monitor during {command}")
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            reply = json.loads(line)
            if "return" in reply or "error" in reply:
                return dict(reply)


def screendump(qmp_socket: Path, target: Path, *, timeout: float = 30.0) -> None:
    """A PNG of the guest's display, from QEMU's QMP socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(qmp_socket))
        sock.recv(65536)  # the greeting
        qmp(sock, "qmp_capabilities")
        reply = qmp(sock, "screendump", filename=str(target), format="png")
    if "error" in reply:
        raise TestFailure(f"QEMU could not photograph the screen: {reply['error']}")
    deadline = time.monotonic() + timeout
    while not (target.is_file() and target.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.2)


def png_pixels(data: bytes) -> tuple[int, int, int, bytes]:
    """(width, height, bytes per pixel, raw rows without filter bytes) of an
    8-bit, non-interlaced RGB or RGBA PNG such as QEMU writes."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if depth != 8 or colour not in (2, 6) or interlace:
        raise ValueError(f"unsupported PNG (depth {depth}, colour type {colour})")
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows, previous = bytearray(), bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        row = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        unfilter(kind, row, previous, bpp)
        rows += row
        previous = row
    return width, height, bpp, bytes(rows)


def unfilter(kind: int, row: bytearray, previous: bytearray, bpp: int) -> None:
    for i in range(len(row)):
        left = row[i - bpp] if i >= bpp else 0
        up = previous[i]
        if kind == 1:
            row[i] = (row[i] + left) & 0xFF
        elif kind == 2:
            row[i] = (row[i] + up) & 0xFF
        elif kind == 3:
            row[i] = (row[i] + (left + up) // 2) & 0xFF
        elif kind == 4:
            corner = previous[i - bpp] if i >= bpp else 0
            estimate = left + up - corner
            pa, pb, pc = abs(estimate - left), abs(estimate - up), abs(estimate - corner)
            row[i] = (
                row[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)
            ) & 0xFF


def distinct_colours(png: Path) -> int:
    width, height, bpp, pixels = png_pixels(png.read_bytes())
    return len({pixels[i : i + 3] for i in range(0, width * height * bpp, bpp)})
