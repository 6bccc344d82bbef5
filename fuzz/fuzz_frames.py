"""Coverage-guided fuzz target for the frame decoder and writer.

Run a bounded session with::

    python fuzz/fuzz_frames.py -max_total_time=60

Any other libFuzzer flag works too.  Without a corpus directory argument
the run starts from the seeds in ``tests/fuzz_corpus/seeds`` and keeps new
inputs in ``fcvsock-fuzz-corpus`` under the temporary directory, where the
next run picks them up.  Inputs that crash are written to
``tests/fuzz_corpus/crashes/``, which ``tests/test_fuzz.py`` replays.

Coverage comes from the pure-Python twin, which atheris instruments.  The
compiled core is not instrumented, so every input runs through both cores
and through a plain reference parser, and any disagreement is a crash.
One input drives the decoder through ``feed`` with the given split points,
through ``read_fd`` on a socket pair with the given read budgets, and then
re-encodes the frames it decoded with both writers.

:func:`check_input` is the whole check; the test suite imports it.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = REPO_ROOT / "tests" / "fuzz_corpus"
SEED_DIR = CORPUS_DIR / "seeds"
CRASH_DIR = CORPUS_DIR / "crashes"
WORK_CORPUS_DIR = Path(tempfile.gettempdir()) / "fcvsock-fuzz-corpus"

HEADER = struct.Struct("<BI")
MAX_PAYLOAD = 16 * 1024 * 1024
MAX_PAYLOAD_CHOICES = (0, 1, 16, 255, 4096, 65536, MAX_PAYLOAD)
BUFFER_SIZE_CHOICES = (64, 65, 100, 256, 1000, 4096, 256 * 1024)
COALESCE_CHOICES = (0, 1, 16, 100, 64 * 1024)
# Sent in one sendall; a socket pair buffers well over this much.
MAX_SOCKET_STREAM = 64 * 1024
# Layout of an input: flags, max_payload, buffer_size, coalesce limit,
# split count, then the split offsets and read budgets as u16 each.
PREAMBLE_SIZE = 5
MAX_SPLITS = 15


@dataclass
class FuzzCase:
    """One fuzz input, decoded into decoder settings and a byte stream."""

    feed_eof: bool
    max_payload: int
    buffer_size: int
    coalesce_limit: int
    splits: list[int]
    stream: bytes


def parse_input(data: bytes) -> FuzzCase:
    """Cut a raw fuzz input into settings and stream; any input is valid."""
    preamble = data[:PREAMBLE_SIZE].ljust(PREAMBLE_SIZE, b"\0")
    flags, payload_index, buffer_index, coalesce_index, split_count = preamble
    split_count %= MAX_SPLITS + 1
    offsets_end = PREAMBLE_SIZE + 2 * split_count
    raw_offsets = data[PREAMBLE_SIZE:offsets_end]
    raw_offsets = raw_offsets[: len(raw_offsets) - len(raw_offsets) % 2]
    stream = data[offsets_end:]
    splits = [value for (value,) in struct.iter_unpack("<H", raw_offsets)]
    return FuzzCase(
        feed_eof=bool(flags & 1),
        max_payload=MAX_PAYLOAD_CHOICES[payload_index % len(MAX_PAYLOAD_CHOICES)],
        buffer_size=BUFFER_SIZE_CHOICES[buffer_index % len(BUFFER_SIZE_CHOICES)],
        coalesce_limit=COALESCE_CHOICES[coalesce_index % len(COALESCE_CHOICES)],
        splits=splits,
        stream=stream,
    )


def reference_decode(stream: bytes, max_payload: int) -> tuple[list[Any], str | None]:
    """Return the complete frames and how the stream ends.

    The ending is ``None`` after a whole frame, ``"header"`` or ``"payload"``
    inside one, or ``"too_large"`` at a header above ``max_payload``.
    """
    frames: list[tuple[int, bytes]] = []
    position = 0
    while True:
        remaining = len(stream) - position
        if remaining == 0:
            return frames, None
        if remaining < HEADER.size:
            return frames, "header"
        frame_type, length = HEADER.unpack_from(stream, position)
        if length > max_payload:
            return frames, "too_large"
        if remaining - HEADER.size < length:
            return frames, "payload"
        begin = position + HEADER.size
        frames.append((frame_type, stream[begin : begin + length]))
        position = begin + length


def _pieces(stream: bytes, splits: list[int]) -> list[bytes]:
    cuts = sorted({split % (len(stream) + 1) for split in splits})
    bounds = [0, *cuts, len(stream)]
    return [stream[start:end] for start, end in itertools.pairwise(bounds)]


def _outcome(error: BaseException) -> tuple[str, str]:
    return type(error).__name__, str(error)


def _error_kind(error: BaseException) -> str:
    part = getattr(error, "part", None)
    if part is not None:
        return str(part)
    return "too_large"


def feed_trace(core: ModuleType, case: FuzzCase) -> dict[str, Any]:
    """Feed the stream in pieces; record frames, the first error and state."""
    from fcvsock.errors import ProtocolError

    decoder = core.FrameDecoder(
        max_payload=case.max_payload, buffer_size=case.buffer_size
    )
    frames: list[tuple[int, bytes]] = []
    error: BaseException | None = None
    # An empty feed at the end raises an error deferred behind frames.
    for piece in [*_pieces(case.stream, case.splits), b""]:
        try:
            frames.extend(decoder.feed(piece))
        except ProtocolError as exc:
            error = exc
            break
    buffered = decoder.buffered
    if error is None and case.feed_eof:
        try:
            decoder.feed_eof()
        except ProtocolError as exc:
            error = exc
    if error is not None:
        try:
            decoder.feed(b"")
        except ProtocolError as again:
            if _outcome(again) != _outcome(error):
                raise AssertionError(
                    f"decoder error not sticky: {again!r} after {error!r}"
                ) from None
        else:
            raise AssertionError(f"decoder error not sticky after {error!r}")
    return {
        "frames": frames,
        "error": None if error is None else _outcome(error),
        "kind": None if error is None else _error_kind(error),
        "buffered": buffered,
    }


def read_fd_trace(core: ModuleType, case: FuzzCase) -> dict[str, Any]:
    """Read the stream from a socket pair with ``read_fd`` until EOF."""
    from fcvsock.errors import ProtocolError

    decoder = core.FrameDecoder(
        max_payload=case.max_payload, buffer_size=case.buffer_size
    )
    budgets = [split % 5000 + 1 for split in case.splits] or [1 << 20]
    local, peer = socket.socketpair()
    frames: list[tuple[int, bytes]] = []
    error: BaseException | None = None
    try:
        local.setblocking(False)
        peer.sendall(case.stream)
        peer.close()
        calls = 0
        while not decoder.at_eof:
            budget = budgets[calls % len(budgets)]
            calls += 1
            try:
                frames.extend(decoder.read_fd(local.fileno(), budget))
                # A zero budget reads nothing and only reports a deferred error.
                buffered = decoder.buffered
                if decoder.read_fd(local.fileno(), 0) or decoder.buffered != buffered:
                    raise AssertionError(f"{core.__name__}: read_fd(fd, 0) consumed")
            except ProtocolError as exc:
                error = exc
                break
        if error is None:
            try:
                decoder.feed_eof()
            except ProtocolError as exc:
                error = exc
    finally:
        local.close()
        peer.close()
    return {
        "frames": frames,
        "error": None if error is None else _outcome(error),
        "kind": None if error is None else _error_kind(error),
    }


def writer_bytes(core: ModuleType, frames: list[Any], coalesce_limit: int) -> bytes:
    """Queue ``frames`` with one writer and flush them through a socket pair."""
    writer = core.FrameWriter(coalesce_limit=coalesce_limit)
    local, peer = socket.socketpair()
    received = bytearray()
    try:
        local.setblocking(False)
        peer.setblocking(False)
        for index, (frame_type, payload) in enumerate(frames):
            body = bytearray(payload) if index % 2 else payload
            writer.write(frame_type, body)
        while writer.flush(local.fileno()):
            received += peer.recv(1 << 20)
        while True:
            try:
                chunk = peer.recv(1 << 20)
            except BlockingIOError:
                break
            received += chunk
    finally:
        local.close()
        peer.close()
    return bytes(received)


def check_input(data: bytes, cores: list[ModuleType] | None = None) -> None:
    """Raise ``AssertionError`` (or whatever escaped a core) on any finding.

    Only ``ProtocolError`` is an expected outcome of decoding; every other
    exception propagates.  ``cores`` defaults to each core that imports.
    """
    from fcvsock import _core

    if cores is None:
        cores = [core for core in (_core.python_core, _core.cython_core) if core]
    case = parse_input(data)
    expected_frames, ending = reference_decode(case.stream, case.max_payload)
    expected_kind = ending if ending == "too_large" or case.feed_eof else None
    traces = []
    for core in cores:
        trace = feed_trace(core, case)
        if trace["frames"] != expected_frames:
            raise AssertionError(
                f"{core.__name__}: feed decoded {len(trace['frames'])} frames, "
                f"reference {len(expected_frames)}"
            )
        if trace["kind"] != expected_kind:
            raise AssertionError(
                f"{core.__name__}: feed ended with {trace['error']}, "
                f"reference {expected_kind}"
            )
        traces.append(trace)
    for trace in traces[1:]:
        if trace != traces[0]:
            raise AssertionError(f"cores disagree on feed: {trace} != {traces[0]}")
    if len(case.stream) <= MAX_SOCKET_STREAM:
        _check_read_fd(cores, case, expected_frames, ending)
    _check_writers(cores, expected_frames, case.coalesce_limit)


def _check_read_fd(
    cores: list[ModuleType],
    case: FuzzCase,
    expected_frames: list[Any],
    ending: str | None,
) -> None:
    outcomes = []
    for core in cores:
        trace = read_fd_trace(core, case)
        if trace["frames"] != expected_frames or trace["kind"] != ending:
            raise AssertionError(
                f"{core.__name__}: read_fd gave {len(trace['frames'])} frames and "
                f"{trace['error']}, reference {len(expected_frames)} and {ending}"
            )
        outcomes.append(trace)
    for trace in outcomes[1:]:
        if trace != outcomes[0]:
            raise AssertionError("cores disagree on read_fd")


def _check_writers(
    cores: list[ModuleType], frames: list[Any], coalesce_limit: int
) -> None:
    expected = b"".join(HEADER.pack(t, len(p)) + p for t, p in frames)
    for core in cores:
        encoded = b"".join(core.encode_frame(t, p) for t, p in frames)
        if encoded != expected:
            raise AssertionError(f"{core.__name__}: encode_frame differs")
        written = writer_bytes(core, frames, coalesce_limit)
        if written != expected:
            raise AssertionError(
                f"{core.__name__}: writer sent {len(written)} bytes, "
                f"expected {len(expected)}"
            )


def seed_inputs() -> dict[str, bytes]:
    """Return named seed inputs that reach each decoder path."""

    def frame(frame_type: int, payload: bytes) -> bytes:
        return HEADER.pack(frame_type, len(payload)) + payload

    small = frame(0x10, b"hello") + frame(0x11, b"") + frame(0x12, b"\0" * 8)
    large = frame(0x10, bytes(range(256)) * 20)
    return {
        "small-frames": bytes([0, 6, 0, 0, 0]) + small,
        "small-frames-split": bytes([1, 6, 0, 1, 3, 1, 0, 7, 0, 12, 0]) + small,
        "large-payload-direct": bytes([1, 4, 0, 0, 2, 3, 0, 200, 0]) + large,
        "too-large": bytes([0, 2, 0, 0, 0]) + frame(1, b"x" * 10) + HEADER.pack(2, 17),
        "truncated-header": bytes([1, 6, 1, 0, 0]) + small + b"\x10\x01",
        "truncated-payload": bytes([1, 6, 2, 0, 0]) + small + b"\x10\x00\x01\0\0ab",
        "max-length-field": bytes([1, 6, 0, 0, 0]) + b"\x10\xff\xff\xff\xff",
    }


def write_seeds() -> None:
    """Write :func:`seed_inputs` into the seed corpus directory."""
    SEED_DIR.mkdir(parents=True, exist_ok=True)
    for name, data in seed_inputs().items():
        (SEED_DIR / name).write_bytes(data)


def _fuzz_one(data: bytes) -> None:
    check_input(data)


def main(argv: list[str]) -> None:
    """Start atheris on :func:`check_input` with libFuzzer's ``argv``."""
    import atheris

    with atheris.instrument_imports(include=["fcvsock"]):
        from fcvsock import _core  # noqa: F401

    CRASH_DIR.mkdir(parents=True, exist_ok=True)
    arguments = list(argv)
    if not any(arg.startswith("-artifact_prefix=") for arg in arguments[1:]):
        arguments.insert(1, f"-artifact_prefix={CRASH_DIR}{os.sep}")
    if not any(not arg.startswith("-") for arg in arguments[1:]):
        # libFuzzer adds new inputs to the first directory only, so the
        # seeds in the repository stay as they are.  It exits from C, so no
        # Python cleanup runs; one fixed directory is reused across runs.
        write_seeds()
        WORK_CORPUS_DIR.mkdir(parents=True, exist_ok=True)
        arguments += [str(WORK_CORPUS_DIR), str(SEED_DIR)]
    atheris.Setup(arguments, _fuzz_one)
    atheris.Fuzz()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    main(sys.argv)
