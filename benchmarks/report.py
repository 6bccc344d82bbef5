"""Turn a results document into tables, target verdicts and RESULTS.md.

Everything here reads only the JSON document, so the results page can be
regenerated from ``latest.json`` without measuring again.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

MIB = 1024 * 1024


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]

    def as_text(self) -> str:
        widths = [
            max(len(cell) for cell in column)
            for column in zip(self.headers, *self.rows, strict=True)
        ]
        lines = [self.title]
        for row in [self.headers, *self.rows]:
            cells = [cell.rjust(width) for cell, width in zip(row, widths, strict=True)]
            cells[0] = row[0].ljust(widths[0])
            lines.append("  " + "  ".join(cells))
        return "\n".join(lines)

    def as_markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(self.headers) + " |")
        lines.append(
            "| " + " | ".join(["---"] + ["---:"] * (len(self.headers) - 1)) + " |"
        )
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def size_label(size: int) -> str:
    """Return ``64 B``, ``4 KiB``, ``16 MiB``, ``1 GiB`` and so on."""
    for unit, scale in (("GiB", 1024 * MIB), ("MiB", MIB), ("KiB", 1024)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


def _gbps(summary: dict[str, Any] | None) -> str:
    return "-" if summary is None else f"{summary['median'] / 1e9:.3f}"


def _ratio(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.2f}x"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _receive_table(section: dict[str, Any]) -> Table:
    names = section["contenders"]
    pairs = ["compiled/raw", "compiled/asyncio", "compiled/twin", "twin/asyncio"]
    rows = []
    for size in section["sizes"]:
        result = section["results"][str(size)]
        row = [size_label(size)]
        row += [_gbps(result["bytes_per_s"].get(name)) for name in names]
        row += [_ratio(result["ratios"].get(pair)) for pair in pairs]
        row.append(f"{result['frames_per_s'][names[0]]['median'] / 1e6:.3g}")
        rows.append(row)
    headers = ["payload", *[f"{n} GB/s" for n in names], *pairs]
    headers.append(f"{names[0]} Mframes/s")
    return Table("Receive over a Unix socket (1, 2)", headers, rows)


def _cost_table(section: dict[str, Any]) -> Table:
    names = section["contenders"]
    rows = []
    for size in section["sizes"]:
        result = section["results"][str(size)]
        faults = result["minor_faults_per_frame"]
        cpu = result["cpu_s_per_gb"]
        row = [size_label(size)]
        row += [f"{cpu[n]['median']:.3g}" for n in names]
        row.append(_ratio(result["cpu_ratios"].get("compiled/raw")))
        row += [f"{faults[n]['median']:.3g}" for n in names]
        rows.append(row)
    headers = ["payload", *[f"{n} CPU s/GB" for n in names], "compiled/raw CPU"]
    headers += [f"{n} faults/frame" for n in names]
    title = "Receive cost: CPU time of the receiver and minor page faults per frame"
    return Table(title, headers, rows)


def _decode_table(section: dict[str, Any]) -> Table:
    names = section["contenders"]
    rows = []
    for size in section["sizes"]:
        result = section["results"][str(size)]
        row = [size_label(size)]
        row += [f"{result['frames_per_s'][n]['median'] / 1e6:.3g}" for n in names]
        row.append(_ratio(result["ratios"].get("compiled/twin")))
        rows.append(row)
    headers = ["payload", *[f"{n} Mframes/s" for n in names], "compiled/twin"]
    return Table("Decode only, feed() in 64 KiB slices (2)", headers, rows)


def _write_table(section: dict[str, Any]) -> Table:
    names = section["contenders"]
    rows = []
    for workload, result in section["results"].items():
        row = [workload]
        row += [_gbps(result["bytes_per_s"].get(name)) for name in names]
        row += [
            _ratio(result["ratios"].get(f"{n}/naive")) for n in names if n != "naive"
        ]
        traced = result["syscalls_per_frame_strace"] or {}
        row += [_count((traced.get(n) or {}).get("all")) for n in names]
        rows.append(row)
    headers = ["workload", *[f"{n} GB/s" for n in names]]
    headers += [f"{n}/naive" for n in names if n != "naive"]
    headers += [f"{n} syscalls/frame" for n in names]
    return Table("Write side (3); syscalls per frame from strace -c -f", headers, rows)


def _write_calls_table(section: dict[str, Any]) -> Table:
    names = section["contenders"]
    rows = []
    for workload, result in section["results"].items():
        counts = result["calls_per_frame_python"]
        rows.append(
            [workload, *[_count((counts.get(n) or {}).get("all")) for n in names]]
        )
    title = (
        "Write side: I/O calls per frame seen by in-process wrappers "
        "(blind to calls made from C)"
    )
    return Table(title, ["workload", *names], rows)


def _handshake_table(section: dict[str, Any]) -> Table:
    rows = []
    traced = section["syscalls_per_handshake_strace"] or {}
    python_counts = section["calls_per_handshake_python"]
    for name, latency in section["latency_s"].items():
        rows.append(
            [
                name,
                f"{latency['median'] * 1e6:.0f}",
                _count((traced.get(name) or {}).get("all")),
                _count((traced.get(name) or {}).get("reply_read")),
                _count(python_counts[name]["reply_read"]),
            ]
        )
    headers = [
        "reader", "latency us", "syscalls (strace)", "reply-read syscalls (strace)",
        "reply-read calls (python)",
    ]  # fmt: skip
    title = f"Handshake against the stand-in VM ({section['stand_in']}) (4)"
    return Table(title, headers, rows)


def _stream_table(section: dict[str, Any]) -> Table:
    rows = []
    for name in section["contenders"]:
        growth = section["rss_growth"][name]
        rows.append(
            [
                name,
                _gbps(section["bytes_per_s"][name]),
                f"{growth['median'] / MIB:.1f}",
                f"{growth['max'] / MIB:.1f}",
            ]
        )
    size = size_label(section["stream_bytes"])
    title = f"Stream {size} of head -c from the stand-in VM (5)"
    headers = ["consumer", "GB/s", "RSS growth MiB (median)", "RSS growth MiB (max)"]
    return Table(title, headers, rows)


def _sessions_table(section: dict[str, Any]) -> Table:
    rows = []
    cases = [
        (f"{n} VM{'s' if n != '1' else ''} x 1 session", result)
        for n, result in section["one_session_per_vm"].items()
    ]
    one_vm = section["many_sessions_on_one_vm"]
    cases.append((f"1 VM x {one_vm['sessions']} sessions", one_vm))
    for label, result in cases:
        rate = result["sessions_per_s"]
        wall = result["wall_s"]
        rows.append(
            [
                label,
                f"{rate['aio/concurrent']['median']:.0f}",
                f"{rate['blocking/sequential']['median']:.0f}",
                _ratio(result["ratios"]["aio/concurrent / blocking/sequential"]),
                f"{wall['aio/concurrent']['median'] * 1e3:.1f}",
                f"{wall['blocking/sequential']['median'] * 1e3:.1f}",
            ]
        )
    headers = [
        "case", "aio/concurrent sessions/s", "blocking/sequential sessions/s",
        "concurrent/sequential", "aio wall ms", "blocking wall ms",
    ]  # fmt: skip
    title = (
        f"Many sessions of `true` (6); {section['vms_started']} VMs with an agent "
        f"each started in {section['vm_startup_s']:.1f} s, not timed"
    )
    return Table(title, headers, rows)


_TABLES: dict[str, list[Callable[[dict[str, Any]], Table]]] = {
    "decode": [_decode_table],
    "receive": [_receive_table, _cost_table],
    "write": [_write_table, _write_calls_table],
    "handshake": [_handshake_table],
    "stream": [_stream_table],
    "sessions": [_sessions_table],
}


def tables(document: dict[str, Any]) -> list[Table | str]:
    """Return one table per section, or a line saying why it is missing."""
    items: list[Table | str] = []
    for name, builders in _TABLES.items():
        section = document["sections"].get(name)
        if section is None:
            items.append(f"{name}: not run")
        elif "error" in section:
            items.append(f"{name}: failed: {section['error']}")
        elif "skipped" in section:
            items.append(f"{name}: skipped: {section['skipped']}")
        else:
            items += [build(section) for build in builders]
    return items


# Targets.


@dataclass
class Target:
    key: str
    description: str
    threshold: float
    at_most: bool
    unit: str
    read: Callable[[dict[str, Any]], float | None]


def _section(document: dict[str, Any], name: str) -> dict[str, Any] | None:
    section = document["sections"].get(name)
    if section is None or "error" in section or "skipped" in section:
        return None
    return section


def _receive_ratio(pair: str, size: int) -> Callable[[dict[str, Any]], float | None]:
    def read(document: dict[str, Any]) -> float | None:
        section = _section(document, "receive")
        if section is None or str(size) not in section["results"]:
            return None
        return section["results"][str(size)]["ratios"].get(pair)

    return read


def _decode_ratio(document: dict[str, Any]) -> float | None:
    section = _section(document, "decode")
    if section is None or "64" not in section["results"]:
        return None
    return section["results"]["64"]["ratios"].get("compiled/twin")


def _handshake_syscall_ratio(document: dict[str, Any]) -> float | None:
    section = _section(document, "handshake")
    if section is None:
        return None
    counts = (
        section["syscalls_per_handshake_strace"]
        or section["calls_per_handshake_python"]
    )
    return counts["fcvsock"]["reply_read"] / counts["bytewise"]["reply_read"]


def _slow_rss_growth(document: dict[str, Any]) -> float | None:
    section = _section(document, "stream")
    if section is None:
        return None
    slow = [name for name in section["contenders"] if name.startswith("slow/")]
    if not slow:
        return None
    return section["rss_growth"][slow[0]]["max"] / MIB


TARGETS = [
    Target(
        "1a", "receive 16 MiB frames: compiled vs raw recv_into ceiling",
        0.85, False, "x", _receive_ratio("compiled/raw", 16 * MIB),
    ),
    Target(
        "1b", "receive 16 MiB frames: compiled vs asyncio readexactly",
        2.0, False, "x", _receive_ratio("compiled/asyncio", 16 * MIB),
    ),
    Target(
        "2a", "decode 64 B frames: compiled vs twin",
        3.0, False, "x", _decode_ratio,
    ),
    Target(
        "2b", "receive 64 B frames: compiled vs asyncio readexactly",
        5.0, False, "x", _receive_ratio("compiled/asyncio", 64),
    ),
    Target(
        "4", "handshake reply-read syscalls: fcvsock vs byte-at-a-time",
        1 / 3, True, "x", _handshake_syscall_ratio,
    ),
    Target(
        "5", "peak RSS growth, 1 GiB to a slow consumer (max over runs)",
        64.0, True, " MiB", _slow_rss_growth,
    ),
]  # fmt: skip


def judge_targets(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Return PASS, MISS or SKIP for every target, from same-run numbers."""
    verdicts = []
    for target in TARGETS:
        value = target.read(document)
        if document["quick"]:
            status = "SKIP"
            reason = "quick mode"
        elif value is None:
            status = "SKIP"
            reason = "not measured in this run"
        else:
            passed = (
                value <= target.threshold
                if target.at_most
                else value >= target.threshold
            )
            status = "PASS" if passed else "MISS"
            reason = ""
        verdicts.append(
            {
                "key": target.key,
                "description": target.description,
                "threshold": target.threshold,
                "at_most": target.at_most,
                "unit": target.unit,
                "value": value,
                "status": status,
                "reason": reason,
            }
        )
    return verdicts


def verdict_line(verdict: dict[str, Any]) -> str:
    """Return one ``PASS``/``MISS``/``SKIP`` line for a target."""
    relation = "<=" if verdict["at_most"] else ">="
    unit = verdict["unit"]
    wanted = f"{relation} {verdict['threshold']:.3g}{unit}"
    value = verdict["value"]
    measured = "not measured" if value is None else f"{value:.3g}{unit}"
    line = f"{verdict['status']} ({verdict['key']}) {verdict['description']}: "
    line += f"{measured}, target {wanted}"
    if verdict["reason"]:
        line += f" [{verdict['reason']}]"
    return line


def console_report(document: dict[str, Any]) -> str:
    """Return the tables and target lines printed after a run."""
    parts = []
    for item in tables(document):
        parts.append(item.as_text() if isinstance(item, Table) else item)
    parts.append("Targets (same-run ratios):")
    parts.append("\n".join(verdict_line(v) for v in document["targets"]))
    return "\n\n".join(parts)


# Results page.


def _machine_lines(machine: dict[str, Any]) -> list[str]:
    memory = machine.get("memory_bytes")
    return [
        (
            f"- CPU: {machine['cpu_model']}, {machine['logical_cpus']} logical CPUs "
            f"({machine['usable_cpus']} usable)"
        ),
        f"- memory: {memory / 2**30:.1f} GiB" if memory else "- memory: unknown",
        f"- kernel: {machine['kernel']}",
        f"- Python: {machine['python']}",
        f"- date: {machine['date']}",
        (
            f"- fcvsock {machine['fcvsock_version']} at commit "
            f"{machine['git_commit']}, compiled core built: "
            f"{machine['compiled_core_built']}"
        ),
        (
            f"- load average at start / end: "
            f"{_load(machine.get('load_average_start'))} / "
            f"{_load(machine.get('load_average_end'))}"
        ),
    ]


def _load(values: Sequence[float] | None) -> str:
    return "-" if not values else ", ".join(f"{v:.2f}" for v in values)


def results_page(document: dict[str, Any], json_name: str, plots: Sequence[str]) -> str:
    """Return RESULTS.md for ``document``; ``plots`` are paths relative to it."""
    lines = [
        "# Benchmark results",
        "",
        (
            f"Generated from `{json_name}`, written by "
            f"`{document.get('command', 'python -m benchmarks')}`. Regenerate "
            "this page without measuring with `python -m benchmarks --render-only`."
        ),
        "",
        "## Machine",
        "",
        *_machine_lines(document["machine"]),
        "",
        (
            f"Repetitions per comparison: {document['repetitions']}, contenders "
            "interleaved. Absolute numbers are medians, and ratios are medians "
            "of per-repetition ratios. The machine is shared, so compare ratios "
            "across runs, not absolute numbers."
        ),
        "",
        "## Targets",
        "",
    ]
    lines += [f"- {verdict_line(v)}" for v in document["targets"]]
    lines += ["", "## Tables", ""]
    for item in tables(document):
        lines += [item.as_markdown() if isinstance(item, Table) else f"- {item}", ""]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{os.path.basename(p)}]({p})" for p in plots]
        lines.append("")
    notes = document.get("notes") or []
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)


# README summary.

README_START = "<!-- benchmarks:start -->"
README_END = "<!-- benchmarks:end -->"


def readme_summary(document: dict[str, Any], page_link: str) -> str:
    """Return the README's results block: machine, targets, receive table."""
    machine = document["machine"]
    lines = [
        README_START,
        (
            f"Latest full run: {machine['date'][:10]} on {machine['cpu_model']}, "
            f"{machine['usable_cpus']} usable CPUs, {machine['kernel']}, "
            f"{machine['python']}; {document['repetitions']} interleaved "
            f"repetitions, medians. All tables and plots: [{page_link}]({page_link})."
        ),
        "",
    ]
    lines += [f"- {verdict_line(v)}" for v in document["targets"]]
    receive = _section(document, "receive")
    if receive is not None:
        lines += ["", _receive_table(receive).as_markdown()]
    lines.append(README_END)
    return "\n".join(lines)


def update_readme(readme: str, summary: str) -> str:
    """Return ``readme`` with the block between the markers replaced."""
    start = readme.find(README_START)
    end = readme.find(README_END)
    if start < 0 or end < start:
        raise ValueError(
            f"update README: markers {README_START} and {README_END} not found"
        )
    return readme[:start] + summary + readme[end + len(README_END):]
