"""End to end: ``head -c 1G /dev/zero`` in a stand-in VM, streamed to the host.

Each run is a consumer child (``benchmarks.child stream``) that iterates
:func:`fcvsock.stream` and records its own RSS: ``VmRSS`` sampled every
20 ms, and ``VmHWM`` after resetting it through ``/proc/self/clear_refs``
just before the stream starts.  Growth is the peak minus the RSS before
the stream started.  The VM (muxer and agent) runs in another process.

- ``fast/compiled`` and ``fast/twin``: consumers that drop each chunk at
  once, with the compiled core and with ``FCVSOCK_NO_EXTENSIONS=1``;
- ``slow/compiled``: a consumer that sleeps ``SLOW_SLEEP`` seconds after
  every ``SLOW_EVERY`` chunks, so the agent produces faster than the host
  consumes and the session must stop reading instead of buffering.
"""

from __future__ import annotations

import tempfile
from typing import Any

from benchmarks import measure, standin
from fcvsock import _core

FULL_BYTES = 1 << 30
QUICK_BYTES = 16 << 20
# The agent sends chunks of at most 64 KiB: 10 ms per 16 chunks caps the
# slow consumer near 100 MiB/s.
SLOW_SLEEP = 0.01
SLOW_EVERY = 16
CHILD_TIMEOUT = 900.0
RSS_GROWTH_LIMIT = 64 << 20


def _consume(path: str, size: int, *, slow: bool, twin: bool) -> dict[str, Any]:
    arguments = [path, "--bytes", str(size)]
    if slow:
        arguments += ["--sleep", str(SLOW_SLEEP), "--sleep-every", str(SLOW_EVERY)]
    # Set both ways, so a caller's own FCVSOCK_NO_EXTENSIONS cannot leak in.
    env = {"FCVSOCK_NO_EXTENSIONS": "1" if twin else "0"}
    result: dict[str, Any] = measure.run_child_json(
        measure.child_command("stream", *arguments), env=env, timeout=CHILD_TIMEOUT
    )
    expected_core = "python" if twin else "cython"
    if result["core"] != expected_core:
        raise RuntimeError(
            f"stream: consumer used the {result['core']} core, expected {expected_core}"
        )
    if result["bytes"] != size or result["exit_code"] != 0:
        raise RuntimeError(
            f"stream: got {result['bytes']} bytes and exit code "
            f"{result['exit_code']}, expected {size} bytes and 0"
        )
    peak = result["rss_peak_hwm"] or result["rss_peak_sampled"]
    result["rss_growth"] = peak - result["rss_before"]
    result["bytes_per_s"] = size / result["seconds"]
    return result


def run(quick: bool, repetitions: int) -> dict[str, Any]:
    """Stream from one stand-in VM with fast and slow consumers, interleaved."""
    if not standin.has_agent():
        return {"skipped": f"stand-in VM has no agent ({standin.kind()})"}
    size = QUICK_BYTES if quick else FULL_BYTES
    with (
        tempfile.TemporaryDirectory(prefix="fcvsock-bench-") as directory,
        standin.stand_in_vms(directory, 1) as (path,),
    ):
        trials = {
            "fast/compiled": lambda: _consume(path, size, slow=False, twin=False),
            "fast/twin": lambda: _consume(path, size, slow=False, twin=True),
            "slow/compiled": lambda: _consume(path, size, slow=True, twin=False),
        }
        if _core.cython_core is None:
            del trials["fast/compiled"]
            trials["slow/twin"] = trials.pop("slow/compiled")
        runs = measure.run_interleaved(trials, repetitions)
    return {
        "unit": "bytes/s of stdout delivered to the consumer",
        "stream_bytes": size,
        "slow_consumer": {"sleep_s": SLOW_SLEEP, "every_chunks": SLOW_EVERY},
        "rss_growth_limit": RSS_GROWTH_LIMIT,
        "contenders": list(trials),
        "bytes_per_s": {
            name: measure.summarize([r["bytes_per_s"] for r in results])
            for name, results in runs.items()
        },
        "rss_growth": {
            name: measure.summarize([r["rss_growth"] for r in results])
            for name, results in runs.items()
        },
        "ratios": _ratios(runs),
        "runs": runs,
    }


def _ratios(runs: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    if "fast/compiled" not in runs:
        return {}
    return {
        "fast/compiled / fast/twin": measure.paired_ratio(
            [r["bytes_per_s"] for r in runs["fast/compiled"]],
            [r["bytes_per_s"] for r in runs["fast/twin"]],
        )
    }
