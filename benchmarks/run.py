"""Run every fcvsock benchmark, print a table, write JSON, plots and RESULTS.md.

Usage: ``python -m benchmarks [--quick] [--output-dir DIR] [--section NAME]``
(``python benchmarks/run.py`` works too).  See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script: make the repository root importable for "benchmarks".
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import (
    decode,
    handshake,
    machine,
    plots,
    receive,
    report,
    sessions,
    standin,
    stream,
    syscalls,
    write,
)

BENCHMARKS_DIR = Path(__file__).resolve().parent
DEFAULT_OUTPUT_DIR = BENCHMARKS_DIR / "results"
QUICK_OUTPUT_DIR = DEFAULT_OUTPUT_DIR / "quick"
RESULTS_PAGE = BENCHMARKS_DIR / "RESULTS.md"
README = BENCHMARKS_DIR.parent / "README.md"
JSON_NAME = "latest.json"
FULL_REPETITIONS = 7
QUICK_REPETITIONS = 2
SCHEMA_VERSION = 1


def _sections(trace: bool) -> dict[str, Callable[[bool, int], dict[str, Any]]]:
    return {
        "decode": decode.run,
        "receive": receive.run,
        "write": lambda quick, reps: write.run(quick, reps, trace),
        "handshake": lambda quick, reps: handshake.run(quick, reps, trace),
        "stream": stream.run,
        "sessions": sessions.run,
    }


SECTION_NAMES = list(_sections(False))


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure fcvsock's frame core, handshake, streaming and "
        "sessions against the baselines, print a table and write "
        "JSON, PNG plots and a results page.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and 2 repetitions; targets are not judged "
        "(default output directory: benchmarks/results/quick)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        help="directory for latest.json and the plots (default: benchmarks/results)",
    )
    parser.add_argument(
        "--results-page",
        type=Path,
        help="where to write the results page (default: benchmarks/RESULTS.md "
        "for a full run into the default directory, else RESULTS.md in the "
        "output directory)",
    )
    parser.add_argument(
        "--repetitions",
        type=int,
        help=f"repetitions per comparison (default: {FULL_REPETITIONS}, "
        f"{QUICK_REPETITIONS} with --quick)",
    )
    parser.add_argument(
        "--section",
        action="append",
        choices=SECTION_NAMES,
        help="run only this section; repeat for several (default: all)",
    )
    parser.add_argument(
        "--no-strace",
        action="store_true",
        help="skip the strace syscall counts (in-process counts remain)",
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="regenerate the table, plots and results page from the existing "
        "JSON without measuring",
    )
    return parser


def _output_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    output_dir = args.output_dir or (
        QUICK_OUTPUT_DIR if args.quick else DEFAULT_OUTPUT_DIR
    )
    if args.results_page is not None:
        page = args.results_page
    elif not args.quick and args.output_dir is None:
        page = RESULTS_PAGE
    else:
        page = output_dir / "RESULTS.md"
    return output_dir, page


def measure_all(
    quick: bool, repetitions: int, names: Sequence[str], trace: bool
) -> dict[str, Any]:
    """Run the named sections and return the results document."""
    started = time.perf_counter()
    document: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "quick": quick,
        "repetitions": repetitions,
        "machine": machine.describe(),
        "stand_in": standin.kind(),
        "strace": trace,
        "sections": {},
        "section_seconds": {},
        "notes": [],
    }
    for name, run in _sections(trace).items():
        if name not in names:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        section_start = time.perf_counter()
        try:
            document["sections"][name] = run(quick, repetitions)
        except Exception as exc:  # noqa: BLE001
            # One broken section must not hide the results of the others.
            traceback.print_exc()
            document["sections"][name] = {"error": f"{type(exc).__name__}: {exc}"}
        document["section_seconds"][name] = time.perf_counter() - section_start
    document["machine"]["load_average_end"] = machine.load_average()
    document["seconds"] = time.perf_counter() - started
    if not trace:
        document["notes"].append(
            "strace was not used: syscall counts are in-process only"
        )
    if document["stand_in"] != "localvm":
        document["notes"].append(
            f"stand-in VM: {document['stand_in']}, so the sections that need "
            "the agent were skipped"
        )
    document["targets"] = report.judge_targets(document)
    return document


def _format_json(value: Any, indent: str = "") -> str:
    # One key per line, but a list of numbers on one line: samples and RSS
    # traces would otherwise take tens of thousands of lines.
    inner = indent + " "
    if isinstance(value, dict) and value:
        items = [
            f"{inner}{json.dumps(str(k))}: {_format_json(v, inner)}"
            for k, v in value.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        items = [inner + _format_json(v, inner) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + indent + "]"
    return json.dumps(value, separators=(",", ":"))


def _write_json(document: dict[str, Any], path: Path) -> None:
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(_format_json(document) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def publish(document: dict[str, Any], output_dir: Path, page: Path) -> None:
    """Print the report and write the plots and the results page."""
    print(report.console_report(document))
    written: list[str] = []
    if plots.matplotlib_available():
        written = plots.write_plots(document, str(output_dir))
    else:
        print(
            "plots skipped: matplotlib is not installed "
            "(pip install -e '.[bench]' installs it)",
            file=sys.stderr,
        )
    relative_plots = [os.path.relpath(p, page.parent) for p in written]
    json_name = os.path.relpath(output_dir / JSON_NAME, page.parent)
    page.write_text(
        report.results_page(document, json_name, relative_plots),
        encoding="utf-8",
    )
    for path in [output_dir / JSON_NAME, *map(Path, written), page]:
        print(f"wrote {path}", file=sys.stderr)
    if page == RESULTS_PAGE and not document.get("quick"):
        _update_readme(document)


def _update_readme(document: dict[str, Any]) -> None:
    """Put the targets and the receive table of a full run in the README."""
    link = os.path.relpath(RESULTS_PAGE, README.parent)
    summary = report.readme_summary(document, link)
    text = README.read_text(encoding="utf-8")
    README.write_text(report.update_readme(text, summary), encoding="utf-8")
    print(f"wrote the results summary in {README}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks; return 1 if any section failed."""
    args = _build_parser().parse_args(argv)
    output_dir, page = _output_paths(args)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / JSON_NAME

    if args.render_only:
        document = json.loads(json_path.read_text(encoding="utf-8"))
        publish(document, output_dir, page)
        return 0

    repetitions = args.repetitions or (
        QUICK_REPETITIONS if args.quick else FULL_REPETITIONS
    )
    if repetitions < 1:
        raise SystemExit(
            f"benchmarks: --repetitions must be at least 1, got {repetitions}"
        )
    trace = not args.no_strace and syscalls.strace_available()
    if not args.no_strace and not trace:
        print(
            "strace is missing or cannot trace here; counting in process only",
            file=sys.stderr,
        )

    document = measure_all(
        args.quick, repetitions, args.section or SECTION_NAMES, trace
    )
    document["command"] = " ".join(["python -m benchmarks", *(argv or sys.argv[1:])])
    _write_json(document, json_path)
    publish(document, output_dir, page)

    failed = [name for name, s in document["sections"].items() if "error" in s]
    if failed:
        print(f"benchmarks: sections failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
