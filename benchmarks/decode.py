"""Decode-only frame rate: ``FrameDecoder.feed`` on a pre-built buffer.

No socket is involved.  The buffer contains back-to-back frames and is fed in
64 KiB slices, the size a socket read typically returns, so frames straddle
slice boundaries as they do on the wire.
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
FULL_FRAMES = {64: 1_000_000, 4096: 100_000}
QUICK_FRAMES = 2_000


def decode_trial(core: ModuleType, stream: bytes, frames: int) -> float:
    decoder = core.FrameDecoder()
    view = memoryview(stream)
    decoded = 0
    start = time.perf_counter()
    for offset in range(0, len(stream), CHUNK_SIZE):
        decoded += len(decoder.feed(view[offset : offset + CHUNK_SIZE]))
    elapsed = time.perf_counter() - start
    if decoded != frames:
        raise RuntimeError(f"decode: got {decoded} frames, expected {frames}")
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
        frames = QUICK_FRAMES if quick else FULL_FRAMES[size]
        stream = build_frames(size, frames)
        trials = {
            name: (
                lambda core=core, stream=stream, frames=frames: decode_trial(
                    core, stream, frames
                )
            )
            for name, core in cores.items()
        }
        seconds = measure.run_interleaved(trials, repetitions)
        frame_rates = {name: measure.rates(frames, v) for name, v in seconds.items()}
        results[str(size)] = {
            "payload_bytes": size,
            "frames": frames,
            "chunk_bytes": CHUNK_SIZE,
            "frames_per_s": {
                name: measure.summarize(v) for name, v in frame_rates.items()
            },
            "ratios": _ratios(frame_rates),
        }
    return {
        "unit": "frames/s",
        "sizes": SIZES,
        "contenders": list(cores),
        "compiled_missing": _core.cython_core is None,
        "results": results,
    }


def _ratios(frame_rates: dict[str, list[float]]) -> dict[str, float]:
    if "compiled" not in frame_rates:
        return {}
    return {
        "compiled/twin": measure.paired_ratio(
            frame_rates["compiled"], frame_rates["twin"]
        )
    }
