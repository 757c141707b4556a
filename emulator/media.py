"""Tiny but real media bytes: PNG images, animated GIFs, text and a safetensors stub."""

from __future__ import annotations

import hashlib
import json
import struct
import zlib

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GIF_MAGIC = b"GIF89a"


def color_for(seed: str) -> tuple[int, int, int]:
    digest = hashlib.sha256(seed.encode()).digest()
    return digest[0], digest[1], digest[2]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A ``width`` x ``height`` RGB PNG: a vertical gradient from ``rgb`` to black."""
    rows = bytearray()
    for y in range(height):
        scale = 1 - y / max(height, 1) / 2
        pixel = bytes(int(c * scale) for c in rgb)
        rows += b"\x00" + pixel * width
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_MAGIC + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(bytes(rows))) + _chunk(b"IEND", b"")


def _lzw_min2(indices: list[int]) -> bytes:
    """LZW data for a 4-colour GIF frame, with a clear code every 2 pixels so codes stay 3 bits wide."""
    clear, end = 4, 5
    codes: list[int] = []
    for i, index in enumerate(indices):
        if i % 2 == 0:
            codes.append(clear)
        codes.append(index)
    codes.append(end)
    bits = 0
    count = 0
    out = bytearray()
    for code in codes:
        bits |= code << count
        count += 3
        while count >= 8:
            out.append(bits & 0xFF)
            bits >>= 8
            count -= 8
    if count:
        out.append(bits & 0xFF)
    blocks = bytearray([2])  # LZW minimum code size
    for start in range(0, len(out), 255):
        piece = out[start : start + 255]
        blocks += bytes([len(piece)]) + piece
    return bytes(blocks + b"\x00")


def gif(width: int, height: int, rgb: tuple[int, int, int], frames: int = 4) -> bytes:
    """An animated, looping GIF: a bar of ``rgb`` sweeping over a dark background."""
    palette = bytes([16, 16, 24]) + bytes(rgb) + bytes([255, 255, 255]) + bytes([0, 0, 0])
    data = bytearray(GIF_MAGIC + struct.pack("<HHBBB", width, height, 0xF1, 0, 0) + palette)
    data += b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"  # loop forever
    for frame in range(frames):
        data += b"\x21\xf9\x04\x04" + struct.pack("<H", 12) + b"\x00\x00"  # 120 ms per frame
        data += b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
        bar = frame * width // max(frames, 1)
        indices = [1 if bar <= x < bar + max(width // frames, 1) else 0 for _y in range(height) for x in range(width)]
        data += _lzw_min2(indices)
    return bytes(data + b"\x3b")


def safetensors_stub(name: str) -> bytes:
    """A valid safetensors file holding no tensor, only metadata."""
    header = json.dumps({"__metadata__": {"format": "pt", "name": name}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header
