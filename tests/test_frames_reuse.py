"""Large payload buffers: reused only when no other reference exists."""

from __future__ import annotations

import struct
from types import ModuleType

import pytest

from fcvsock import _core

SIZE = 2 << 20


def _frame(fill: int) -> bytes:
    return struct.pack("<BI", 0x10, SIZE) + bytes([fill]) * SIZE


def _decode_one(decoder: object, fill: int) -> bytes:
    frames = decoder.feed(_frame(fill))  # type: ignore[attr-defined]
    assert len(frames) == 1
    return frames[0][1]


def test_held_payload_never_changes(frame_core: ModuleType) -> None:
    decoder = frame_core.FrameDecoder()
    held = [_decode_one(decoder, fill) for fill in range(6)]
    for fill, payload in enumerate(held):
        assert payload == bytes([fill]) * SIZE


def test_reused_payload_hashes_its_new_content(frame_core: ModuleType) -> None:
    decoder = frame_core.FrameDecoder()
    first = _decode_one(decoder, 1)
    stale_hash = hash(first)
    del first
    for fill in range(2, 6):
        payload = _decode_one(decoder, fill)
        assert hash(payload) == hash(bytes(payload))
        assert hash(payload) != stale_hash
        del payload


def test_compiled_core_reuses_dropped_payload() -> None:
    if _core.cython_core is None:
        pytest.skip("compiled core not built")
    decoder = _core.cython_core.FrameDecoder()
    addresses = set()
    for fill in range(8):
        payload = _decode_one(decoder, fill)
        assert payload[0] == fill
        addresses.add(id(payload))
        del payload
    assert len(addresses) <= 3
