"""Fuzzing of every parser that reads bytes from the other side.

The frame decoder (both cores) must turn any byte stream, cut anywhere, into
frames or a ``ProtocolError``, and must not allocate for a payload above its
limit.  The handshake reply parser must return a reply or raise
``HandshakeError``.  The agent's START decoding must return a
``StartRequest`` or raise ``ValueError``.  Inputs kept under
``tests/fuzz_corpus/`` by ``fuzz/fuzz_frames.py`` are replayed here.

``FCVSOCK_FUZZ_EXAMPLES`` multiplies the number of hypothesis examples, for
long runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import struct
import sys
import tempfile
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fcvsock import _core
from fcvsock.errors import (
    FrameTooLargeError,
    HandshakeError,
    HandshakeTimeoutError,
    ProtocolError,
)
from fcvsock.handshake import (
    MAX_REPLY,
    _ended_early,
    _NotReady,
    _parse_reply,
    connect_blocking,
)
from fcvsock.protocol import MAX_PAYLOAD, StartRequest

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = REPO_ROOT / "tests" / "fuzz_corpus"
SCALE = float(os.environ.get("FCVSOCK_FUZZ_EXAMPLES", "1"))
KIB = 1024


def _examples(count: int) -> int:
    return max(1, int(count * SCALE))


def _load_fuzz_target() -> ModuleType:
    path = REPO_ROOT / "fuzz" / "fuzz_frames.py"
    spec = importlib.util.spec_from_file_location("fuzz_frames", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses looks the module up by name while the class is created.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


fuzz_frames = _load_fuzz_target()


def header(frame_type: int, length: int) -> bytes:
    return struct.pack("<BI", frame_type, length)


def frame(frame_type: int, payload: bytes) -> bytes:
    return header(frame_type, len(payload)) + payload


def available_cores() -> list[ModuleType]:
    cores = [_core.python_core]
    if _core.cython_core is not None and not _core.extensions_disabled:
        cores.append(_core.cython_core)
    return cores


# -- frame decoder ------------------------------------------------------------


@settings(max_examples=_examples(400), deadline=None)
@given(
    stream=st.binary(max_size=2000),
    splits=st.lists(st.integers(0, 2000), max_size=12),
    max_payload=st.sampled_from([0, 1, 7, 100, 1000, MAX_PAYLOAD]),
    buffer_size=st.sampled_from([64, 65, 100, 256, 4096]),
    feed_eof=st.booleans(),
)
def test_decoder_arbitrary_bytes(
    frame_core: ModuleType,
    stream: bytes,
    splits: list[int],
    max_payload: int,
    buffer_size: int,
    feed_eof: bool,
) -> None:
    case = fuzz_frames.FuzzCase(feed_eof, max_payload, buffer_size, 0, splits, stream)
    trace = fuzz_frames.feed_trace(frame_core, case)
    expected, ending = fuzz_frames.reference_decode(stream, max_payload)
    assert trace["frames"] == expected
    assert trace["kind"] == (ending if ending == "too_large" or feed_eof else None)


frame_streams = st.lists(
    st.tuples(
        st.integers(0, 255),
        st.one_of(st.binary(max_size=30), st.binary(min_size=100, max_size=1500)),
    ),
    max_size=10,
)


@settings(max_examples=_examples(200), deadline=None)
@given(
    frames=frame_streams,
    tail=st.binary(max_size=20),
    splits=st.lists(st.integers(0, 20000), max_size=12),
    buffer_size=st.sampled_from([64, 100, 256, 4096]),
)
def test_decoder_frames_then_garbage(
    frame_core: ModuleType,
    frames: list[tuple[int, bytes]],
    tail: bytes,
    splits: list[int],
    buffer_size: int,
) -> None:
    stream = b"".join(frame(t, p) for t, p in frames) + tail
    case = fuzz_frames.FuzzCase(True, 1500, buffer_size, 0, splits, stream)
    trace = fuzz_frames.feed_trace(frame_core, case)
    assert trace["frames"][: len(frames)] == frames


@settings(max_examples=_examples(100), deadline=None)
@given(
    stream=st.binary(max_size=3000),
    budgets=st.lists(st.integers(1, 6000), max_size=6),
    max_payload=st.sampled_from([0, 16, 1000, MAX_PAYLOAD]),
    buffer_size=st.sampled_from([64, 256, 4096]),
)
def test_decoder_read_fd_arbitrary_bytes(
    frame_core: ModuleType,
    stream: bytes,
    budgets: list[int],
    max_payload: int,
    buffer_size: int,
) -> None:
    case = fuzz_frames.FuzzCase(True, max_payload, buffer_size, 0, budgets, stream)
    trace = fuzz_frames.read_fd_trace(frame_core, case)
    expected, ending = fuzz_frames.reference_decode(stream, max_payload)
    assert trace["frames"] == expected
    assert trace["kind"] == ending


def _peak_while(call: Any) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _feed_all(decoder: Any, pieces: list[bytes]) -> int:
    count = 0
    try:
        for piece in pieces:
            count += len(decoder.feed(piece))
    except ProtocolError:
        pass
    return count


@settings(
    max_examples=_examples(150),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    stream=st.binary(max_size=3000),
    splits=st.lists(st.integers(0, 3000), max_size=8),
    max_payload=st.sampled_from([0, 100, 4096, 64 * KIB]),
    buffer_size=st.sampled_from([64, 256, 4096]),
)
def test_decoder_memory_bounded(
    frame_core: ModuleType,
    stream: bytes,
    splits: list[int],
    max_payload: int,
    buffer_size: int,
) -> None:
    decoder = frame_core.FrameDecoder(max_payload=max_payload, buffer_size=buffer_size)
    pieces = fuzz_frames._pieces(stream, splits)
    frames_seen: list[int] = []
    peak = _peak_while(lambda: frames_seen.append(_feed_all(decoder, pieces)))
    # One pending payload up to the limit, plus the frames cut from the input:
    # each a bytes copy of its payload and a tuple in the returned list.
    bound = max_payload + 3 * len(stream) + 150 * frames_seen[0] + 16 * KIB
    assert peak <= bound


@pytest.mark.parametrize(
    "length", [MAX_PAYLOAD + 1, MAX_PAYLOAD * 2, 2**31, 2**32 - 1], ids=str
)
def test_decoder_oversized_header_allocates_nothing(
    frame_core: ModuleType, length: int
) -> None:
    decoder = frame_core.FrameDecoder()
    errors: list[BaseException] = []

    def feed() -> None:
        try:
            decoder.feed(header(0x10, length) + b"x" * 100)
        except FrameTooLargeError as exc:
            errors.append(exc)

    peak = _peak_while(feed)
    assert len(errors) == 1
    assert peak < 64 * KIB


def test_decoder_max_header_allocates_payload_once(frame_core: ModuleType) -> None:
    decoder = frame_core.FrameDecoder()
    peak = _peak_while(lambda: decoder.feed(header(0x10, MAX_PAYLOAD) + b"x" * 1000))
    assert MAX_PAYLOAD <= peak < MAX_PAYLOAD + 64 * KIB


# -- corpus -------------------------------------------------------------------


def corpus_files() -> list[Path]:
    return sorted(
        path
        for path in CORPUS_DIR.rglob("*")
        if path.is_file() and path.suffix != ".md" and not path.name.startswith(".")
    )


def test_corpus_not_empty() -> None:
    assert corpus_files()


@pytest.mark.parametrize(
    "path", corpus_files(), ids=lambda path: f"{path.parent.name}/{path.name}"
)
def test_corpus_input_replays(path: Path) -> None:
    fuzz_frames.check_input(path.read_bytes(), available_cores())


def test_seed_corpus_up_to_date() -> None:
    seeds = {path.name: path.read_bytes() for path in (CORPUS_DIR / "seeds").iterdir()}
    assert seeds == fuzz_frames.seed_inputs()


@settings(max_examples=_examples(300), deadline=None)
@given(data=st.binary(max_size=1500))
def test_fuzz_target_arbitrary_input(data: bytes) -> None:
    fuzz_frames.check_input(data, available_cores())


# -- handshake reply ----------------------------------------------------------

VALID_PREFIX = re.compile(rb"(O|OK|OK [0-9]{0,10})?")


def _parse(received: bytes) -> tuple[str, Any]:
    try:
        parsed = _parse_reply(received)
    except HandshakeError as exc:
        return "error", exc
    return ("incomplete", None) if parsed is None else ("reply", parsed)


reply_bytes = st.one_of(
    st.binary(max_size=80),
    st.builds(
        lambda digits, rest: b"OK " + digits + b"\n" + rest,
        st.text("0123456789", max_size=12).map(str.encode),
        st.binary(max_size=40),
    ),
    st.sampled_from([b"", b"O", b"OK", b"OK ", b"OK 1", b"OK 4294967296\n"]),
)


@settings(max_examples=_examples(500), deadline=None)
@given(received=reply_bytes)
@example(received=b"OK 4294967295\nrest")
@example(received=b"OK 00000000001\n")
@example(received=b"OK \n")
def test_handshake_reply_outcomes(received: bytes) -> None:
    outcome, value = _parse(received)
    if outcome == "reply":
        port, rest = value
        assert 0 <= port <= 0xFFFFFFFF
        assert received == b"OK %s\n" % received[3 : received.index(b"\n")] + rest
        assert int(received[3 : received.index(b"\n")]) == port
    elif outcome == "incomplete":
        assert VALID_PREFIX.fullmatch(received)
    else:
        assert len(value.reply) <= MAX_REPLY


@settings(max_examples=_examples(500), deadline=None)
@given(received=reply_bytes.filter(bool), cut=st.integers(1, 80))
def test_handshake_reply_prefix_consistent(received: bytes, cut: int) -> None:
    # The client parses only after a read returned at least one byte.
    prefix_outcome, prefix_value = _parse(received[:cut])
    outcome, value = _parse(received)
    if prefix_outcome == "error":
        assert outcome == "error"
    elif prefix_outcome == "reply":
        assert outcome == "reply"
        assert value[0] == prefix_value[0]


@settings(max_examples=_examples(300), deadline=None)
@given(received=st.binary(max_size=80))
def test_handshake_early_eof_outcomes(received: bytes) -> None:
    result = _ended_early(received)
    assert isinstance(result, (_NotReady, HandshakeError))


class ReplyPeer:
    """A socket at ``path`` that replies ``reply`` to every CONNECT and closes."""

    def __init__(self, path: str) -> None:
        self.reply = b""
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(path)
        self._server.listen(16)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.recv(64)
                    conn.sendall(self.reply)
                except OSError:
                    pass

    def close(self) -> None:
        self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self._thread.join(5)


@pytest.fixture(scope="module")
def reply_peer() -> Iterator[tuple[str, ReplyPeer]]:
    with tempfile.TemporaryDirectory(prefix="fz-") as directory:
        path = os.path.join(directory, "vm.sock")
        peer = ReplyPeer(path)
        yield path, peer
        peer.close()


@settings(
    max_examples=_examples(40),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(reply=st.binary(min_size=1, max_size=60))
@example(reply=b"OK 1073741824\n\x12\x04\0\0\0\0\0\0\0")
def test_handshake_over_socket_outcomes(
    reply_peer: tuple[str, ReplyPeer], reply: bytes
) -> None:
    path, peer = reply_peer
    peer.reply = reply
    try:
        handshake = connect_blocking(path, 52, timeout=0.2)
    except HandshakeError:
        assert _parse(reply)[0] == "error" or not VALID_PREFIX.fullmatch(reply)
    except HandshakeTimeoutError:
        assert VALID_PREFIX.fullmatch(reply)
    else:
        handshake.sock.close()
        assert _parse(reply)[0] == "reply"


# -- START decoding -----------------------------------------------------------

START_KEYS = [
    "cmd", "env", "working_dir", "user", "tty", "tty_width", "tty_height",
    "timeout_seconds", "other",
]  # fmt: skip

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)
start_documents = st.dictionaries(
    st.sampled_from(START_KEYS),
    st.one_of(
        json_values,
        st.lists(st.text(max_size=10), max_size=4),
        st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
        st.integers(-5, 70000),
    ),
    max_size=9,
)


def _check_start_outcome(payload: bytes) -> None:
    try:
        request = StartRequest.decode(payload)
    except ValueError:
        return
    assert isinstance(request, StartRequest)
    request.validate()
    assert StartRequest.decode(request.encode()) == request


@settings(max_examples=_examples(500), deadline=None)
@given(payload=st.binary(max_size=200))
def test_start_decode_arbitrary_bytes(payload: bytes) -> None:
    _check_start_outcome(payload)


@settings(max_examples=_examples(150), deadline=None)
@given(value=json_values)
def test_start_decode_arbitrary_json(value: Any) -> None:
    _check_start_outcome(json.dumps(value).encode())


@settings(max_examples=_examples(250), deadline=None)
@given(document=start_documents)
def test_start_decode_start_like_json(document: dict[str, Any]) -> None:
    _check_start_outcome(json.dumps(document).encode())


@settings(max_examples=_examples(100), deadline=None)
@given(document=start_documents, cut=st.integers(0, 400))
def test_start_decode_truncated_json(document: dict[str, Any], cut: int) -> None:
    _check_start_outcome(json.dumps(document).encode()[:cut])


@pytest.mark.parametrize("depth", [10, 500, 990, 1000, 5000, 100_000])
def test_start_decode_deep_nesting(depth: int) -> None:
    nested = b"[" * depth + b"]" * depth
    for payload in (b'{"cmd":' + nested + b"}", b'{"cmd":["a"],"env":' + nested + b"}"):
        with pytest.raises(ValueError):
            StartRequest.decode(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"cmd":["a"],"tty_width":1e999}',
        b'{"cmd":["a"],"tty_width":NaN}',
        b'{"cmd":["a"],"timeout_seconds":' + b"9" * 5000 + b"}",
        b'{"cmd":["\\ud800"],"user":"\\udfff"}',
        b'\xef\xbb\xbf{"cmd":["a"]}',
        b'{"cmd":["a"]}' + b" " * 1000 + b"x",
    ],
    ids=["inf", "nan", "huge-int", "surrogates", "bom", "trailing"],
)
def test_start_decode_odd_json(payload: bytes) -> None:
    _check_start_outcome(payload)


def test_start_decode_boundary_values() -> None:
    request = StartRequest(
        cmd=["x"] * 3, env={"A": "b"}, tty=True, tty_width=0xFFFF,
        tty_height=1, timeout_seconds=2**32 - 1,
    )  # fmt: skip
    assert StartRequest.decode(request.encode()) == request
