"""Speedup over the op's baseline against size: one PNG per op, a row of subplots per implementation
(each backend, and the plain-PyTorch math), a column per dtype mode; eager fwd+bwd solid, eager fwd
dashed, and fwd+bwd replayed from a CUDA graph dotted (where it was measured)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import List


def plot_speedups(records: List[dict], stem: Path) -> List[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FormatStrFormatter, NullFormatter
    except ImportError:
        return []
    ok = [r for r in records if r.get("eager") and r["speedup"].get("base") is not None and r["family"] == "sketch"]
    written = []
    for op in sorted({r["op"] for r in ok}):
        recs = [r for r in ok if r["op"] == op]
        impls = sorted({r["impl"] for r in recs}, key=lambda n: (n == "plain", n))
        modes = [m for m in ("fp32", "tf32", "bf16") if any(r["mode"] == m for r in recs)]
        fig, axes = plt.subplots(len(impls), len(modes), figsize=(5.5 * len(modes), 3.6 * len(impls)), squeeze=False)
        for i, impl in enumerate(impls):
            for j, mode in enumerate(modes):
                ax = axes[i][j]
                lines = defaultdict(list)
                for r in recs:
                    if r["impl"] == impl and r["mode"] == mode:
                        lines[(r["series"], r["pass"])].append((r["x"], r["speedup"]["base"]))
                        graph = (r.get("speedup_graph") or {}).get("base")
                        if r["pass"] == "fwd+bwd" and graph is not None:
                            lines[(r["series"], "graph")].append((r["x"], graph))
                styles = {"fwd+bwd": "o-", "fwd": "x--", "graph": "s:"}
                colors = {}
                for (series, pass_), pts in sorted(lines.items(), key=lambda kv: (kv[0][0], list(styles).index(kv[0][1]))):
                    pts.sort()
                    labelled = series in colors
                    color = colors.setdefault(series, f"C{len(colors) % 10}")
                    ax.plot(*zip(*pts), styles[pass_], color=color, label=None if labelled else series, ms=4)
                ax.axhline(1.0, color="gray", lw=0.8)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
                ax.yaxis.set_minor_formatter(NullFormatter())
                ax.set_title(f"{op} · {impl} · {mode}", fontsize=9)
                ax.set_xlabel(recs[0]["x_key"])
                ax.set_ylabel(f"speedup vs {recs[0]['base']}")
                ax.grid(True, which="both", alpha=0.3)
                if lines:
                    ax.legend(fontsize=6, title="fwd+bwd: solid eager, dotted CUDA graph; fwd: dashed", title_fontsize=6)
        fig.tight_layout()
        path = stem.parent / f"{stem.name}_{op}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(str(path))
    return written
