"""Latency CDF plot of a round-trip result: ``python -m bench.plot [JSON] [PNG]``.

Defaults: bench/results/roundtrip-quick.json -> bench/results/roundtrip-cdf-quick.png.
Needs matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.common import RESULTS

STYLE = {
    "standalone": ("tab:gray", "-"),
    "plain-redis": ("tab:green", "-"),
    "plain-durable": ("tab:green", "--"),
    "coord-same": ("tab:blue", "-"),
    "coord-same-nospec": ("tab:blue", ":"),
    "coord-cross": ("tab:orange", "-"),
}


def cdf_png(result_path: Path, png_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    data: dict[str, Any] = json.loads(result_path.read_text())
    results = data["results"]
    rates = list(results)
    fig, axes = plt.subplots(1, len(rates), figsize=(7 * len(rates), 4.8), squeeze=False)
    for ax, rate in zip(axes[0], rates, strict=True):
        for variant, res in results[rate].items():
            if not isinstance(res, dict) or "samples_ms" not in res:
                continue
            xs = sorted(res["samples_ms"])
            if not xs:
                continue
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            color, line = STYLE.get(variant, (None, "-"))
            ax.plot(xs, ys, line, color=color, label=variant, linewidth=1.6)
        ax.set_xscale("log")
        # Plain decimal ticks (1, 2, 5 per decade), no overlapping 10^x minor labels.
        ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("round trip, oh_user_action -> agent oh_event (ms, log scale)")
        ax.set_ylabel("fraction of actions")
        ax.set_title(f"Round-trip latency CDF at {rate} actions/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.axhline(0.5, color="black", linewidth=0.5, alpha=0.4)
        ax.axhline(0.99, color="black", linewidth=0.5, alpha=0.4)
        ax.legend(loc="lower right", fontsize=8)
    commit = data.get("commit") or data.get("machine", {}).get("commit", "?")
    fig.suptitle(
        f"{data.get('mode', '')} run, commit {commit}, {data.get('machine', {}).get('time', '')}",
        fontsize=9,
    )
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def main(argv: list[str]) -> int:
    src = Path(argv[0]) if argv else RESULTS / "roundtrip-quick.json"
    dst = (
        Path(argv[1])
        if len(argv) > 1
        else src.with_name(src.stem.replace("roundtrip", "roundtrip-cdf") + ".png")
    )
    print(cdf_png(src, dst))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
