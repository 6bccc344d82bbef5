"""Decode-only frame rate: ``FrameDecoder.feed`` on a pre-built buffer.

No socket is involved.  The buffer contains about 16 MiB of back-to-back
frames and is fed in 64 KiB slices, the size a socket read typically
returns, so frames straddle slice boundaries as they do on the wire.  A
trial feeds the buffer several times, calibrated per core to last about
``TRIAL_SECONDS``.
"""

from __future__ import annotations

import time
from types import ModuleType
from typing import Any

from benchmarks import measure
from benchmarks.child import build_frames
from fcvsock import _core

SIZES = [64, 4096]
CHUNK_SIZE = 64 * 1024
STREAM_BYTES = 16 << 20
QUICK_FRAMES = 2_000
TRIAL_SECONDS = 0.3
MAX_PASSES = 1000


def decode_trial(core: ModuleType, stream: bytes, frames: int, passes: int) -> float:
    decoder = core.FrameDecoder()
    view = memoryview(stream)
    slices = [
        view[offset : offset + CHUNK_SIZE]
        for offset in range(0, len(stream), CHUNK_SIZE)
    ]
    decoded = 0
    start = time.perf_counter()
    for _ in range(passes):
        for piece in slices:
            decoded += len(decoder.feed(piece))
    elapsed = time.perf_counter() - start
    if decoded != frames * passes:
        raise RuntimeError(f"decode: got {decoded} frames, expected {frames * passes}")
    return elapsed


def contenders() -> dict[str, ModuleType]:
    """Return the frame cores to compare, compiled first when it is built."""
    cores: dict[str, ModuleType] = {}
    if _core.cython_core is not None:
        cores["compiled"] = _core.cython_core
    cores["twin"] = _core.python_core
    return cores


def run(quick: bool, repetitions: int) -> dict[str, Any]:
    """Measure frames/s of each core at each small payload size."""
    cores = contenders()
    results: dict[str, Any] = {}
    for size in SIZES:
        frames = QUICK_FRAMES if quick else STREAM_BYTES // (size + 5)
        stream = build_frames(size, frames)
        passes = {
            name: _trial_passes(core, stream, frames, quick)
            for name, core in cores.items()
        }
        trials = {
            name: (
                lambda core=core, n=passes[name], stream=stream, frames=frames: (
                    decode_trial(core, stream, frames, n)
                )
            )
            for name, core in cores.items()
        }
        seconds = measure.run_interleaved(trials, repetitions)
        frame_rates = {
            name: measure.rates(frames * passes[name], v) for name, v in seconds.items()
        }
        results[str(size)] = {
            "payload_bytes": size,
            "frames_per_pass": frames,
            "passes_per_trial": passes,
            "chunk_bytes": CHUNK_SIZE,
            "frames_per_s": {
                name: measure.summarize(v) for name, v in frame_rates.items()
            },
            "ratios": _ratios(frame_rates),
        }
    return {
        "unit": "frames/s",
        "sizes": SIZES,
        "trial_seconds": None if quick else TRIAL_SECONDS,
        "contenders": list(cores),
        "compiled_missing": _core.cython_core is None,
        "results": results,
    }


def _trial_passes(core: ModuleType, stream: bytes, frames: int, quick: bool) -> int:
    if quick:
        return 1
    return measure.calibrate(
        lambda passes: decode_trial(core, stream, frames, passes),
        1,
        TRIAL_SECONDS,
        MAX_PASSES,
    )


def _ratios(frame_rates: dict[str, list[float]]) -> dict[str, float]:
    if "compiled" not in frame_rates:
        return {}
    return {
        "compiled/twin": measure.paired_ratio(
            frame_rates["compiled"], frame_rates["twin"]
        )
    }
