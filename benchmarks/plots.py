"""PNG plots of a results document; needs matplotlib (the ``bench`` extra)."""

from __future__ import annotations

import os
from typing import Any

from benchmarks.report import MIB, size_label


def matplotlib_available() -> bool:
    """True when matplotlib imports."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plots(document: dict[str, Any], directory: str) -> list[str]:
    """Write every plot the document has data for; return the file paths."""
    import matplotlib

    matplotlib.use("Agg")
    written = []
    receive = document["sections"].get("receive")
    if receive and "results" in receive:
        written.append(_plot_receive(receive, os.path.join(directory, "receive.png")))
    stream = document["sections"].get("stream")
    if stream and "runs" in stream:
        written.append(_plot_rss(stream, os.path.join(directory, "stream_rss.png")))
    return written


def _plot_receive(section: dict[str, Any], path: str) -> str:
    import matplotlib.pyplot as plt

    sizes = section["sizes"]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name in section["contenders"]:
        summaries = [section["results"][str(s)]["bytes_per_s"][name] for s in sizes]
        medians = [s["median"] / 1e9 for s in summaries]
        lower = [m - s["min"] / 1e9 for m, s in zip(medians, summaries, strict=True)]
        upper = [s["max"] / 1e9 - m for m, s in zip(medians, summaries, strict=True)]
        axes.errorbar(
            sizes, medians, yerr=[lower, upper], marker="o", capsize=3, label=name
        )
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xticks(sizes, [size_label(s) for s in sizes])
    axes.set_xlabel("payload per frame")
    axes.set_ylabel("GB/s received (median, bars: min..max)")
    axes.set_title("Receive throughput over a Unix socket")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _plot_rss(section: dict[str, Any], path: str) -> str:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    colors = {"fast/compiled": "tab:blue", "fast/twin": "tab:orange"}
    for name, runs in section["runs"].items():
        color = colors.get(name, "tab:red")
        for index, run in enumerate(runs):
            times = [t for t, _ in run["rss_samples"]]
            growth = [(rss - run["rss_before"]) / MIB for _, rss in run["rss_samples"]]
            label = name if index == 0 else None
            axes.plot(times, growth, color=color, alpha=0.7, linewidth=1, label=label)
    axes.axhline(
        section["rss_growth_limit"] / MIB, color="black", linestyle="--", label="limit"
    )
    axes.set_xlabel("seconds since the stream started")
    axes.set_ylabel("RSS growth of the consumer (MiB)")
    axes.set_title(
        f"Consumer RSS while streaming {size_label(section['stream_bytes'])}"
    )
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
