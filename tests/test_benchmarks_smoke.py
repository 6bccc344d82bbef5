"""Smoke test of ``python -m benchmarks --quick``: it runs and writes every section.

Timing is not checked here; the benchmarks themselves report it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["decode", "receive", "write", "handshake", "stream", "sessions"]
QUICK_TIMEOUT = 100.0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    output_dir = tmp_path_factory.mktemp("benchmarks")
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--output-dir",
            str(output_dir),
        ],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=QUICK_TIMEOUT,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    document = json.loads((output_dir / "latest.json").read_text(encoding="utf-8"))
    return output_dir, document


@pytest.mark.parametrize("name", SECTIONS)
def test_quick_writes_section(
    quick_run: tuple[Path, dict[str, Any]], name: str
) -> None:
    _, document = quick_run
    assert name in document["sections"]


@pytest.mark.parametrize("name", SECTIONS)
def test_quick_section_did_not_fail(
    quick_run: tuple[Path, dict[str, Any]], name: str
) -> None:
    _, document = quick_run
    assert "error" not in document["sections"].get(name, {})


def test_quick_judges_no_target(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, document = quick_run
    statuses = {target["key"]: target["status"] for target in document["targets"]}
    assert statuses
    assert set(statuses.values()) == {"SKIP"}


def test_quick_records_machine(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, document = quick_run
    for field in ("cpu_model", "logical_cpus", "kernel", "python", "date"):
        assert document["machine"].get(field), field


def test_quick_writes_results_page(quick_run: tuple[Path, dict[str, Any]]) -> None:
    output_dir, _ = quick_run
    page = (output_dir / "RESULTS.md").read_text(encoding="utf-8")
    assert page.startswith("# Benchmark results")


def test_readme_block_replaced_between_markers() -> None:
    from benchmarks import report

    readme = f"intro\n{report.README_START}\nold\n{report.README_END}\nrest\n"
    summary = f"{report.README_START}\nnew\n{report.README_END}"
    updated = report.update_readme(readme, summary)
    assert updated == f"intro\n{summary}\nrest\n"


def test_readme_without_markers_rejected() -> None:
    from benchmarks import report

    with pytest.raises(ValueError, match="markers"):
        report.update_readme("no markers here\n", "summary")
