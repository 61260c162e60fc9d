"""What a run records: environment and versions, the result file's name, the stdout tables, the memory table."""

from __future__ import annotations

import datetime
import importlib.metadata as md
import json
import os
import platform
import re
import subprocess
import warnings
from pathlib import Path
from typing import Optional

import torch

MB = 1e6  # the spec's tables count MB as 10^6 bytes


def _run(cmd) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(dist: str) -> Optional[str]:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def commit() -> dict:
    """$PANTHER_COMMIT where set (a copied tree may carry a stale .git), else the short
    commit from git and whether the tree had changes, else "unknown"."""
    env = os.environ.get("PANTHER_COMMIT")
    if env:
        return {"commit": env, "dirty": None, "source": "PANTHER_COMMIT"}
    here = Path(__file__).resolve().parents[2]
    short = _run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"])
    if short:
        dirty = _run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"])
        return {"commit": short, "dirty": bool(dirty), "source": "git"}
    return {"commit": "unknown", "dirty": None, "source": "none"}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    import panther
    from panther.backends import backend_infos

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "cupy": {d.metadata["Name"]: d.version for d in md.distributions()
                 if (d.metadata["Name"] or "").lower().startswith("cupy")},
        "numpy": _version("numpy"),
        "panther": panther.__version__,
        "backends": [
            {"name": i.name, "version": i.version, "distribution": i.distribution, "unavailable": i.unavailable_reason}
            for i in backend_infos()
        ],
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        **commit(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["device"] = p.name
        env["gpu"] = {
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "multiprocessors": p.multi_processor_count,
            "memory_bytes": p.total_memory,
            "l2_bytes": getattr(p, "L2_cache_size", None),
            "nvidia_smi": _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm",
                                "--format=csv,noheader"]),
        }
    else:
        env["device"] = f"cpu {env['cpu']} ({torch.get_num_threads()} threads)"
    return env


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def result_stem(env: dict, device: torch.device) -> str:
    """<YYYY-MM-DD>_<device-slug>_<short-commit>, the date in UTC."""
    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    dev = slug(env["gpu"]["name"]) if device.type == "cuda" else f"cpu-{slug(env['cpu'])}-{env['torch_threads']}t"
    return f"{day}_{dev}_{slug(env['commit'])}"


def write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(path)  # a run killed mid-write leaves the previous complete file


# --- the results table ---------------------------------------------------------------------------

COLUMNS = (
    ("case", "{:<42}"), ("dtype", "{:<5}"), ("pass", "{:<7}"), ("impl", "{:<9}"), ("eager_ms", "{:>9}"),
    ("graph_ms", "{:>9}"), ("peak_MB", "{:>8}"), ("floor_ms", "{:>9}"), ("%roof", "{:>6}"),
    ("x_base", "{:>7}"), ("x_plain", "{:>7}"), ("x_comp", "{:>7}"), ("err", "{:>8}"),
)


def _num(v, fmt="{:.3g}"):
    return "-" if v is None else fmt.format(v)


def table_row(r: dict) -> str:
    if r.get("skipped") or r.get("error"):
        why = ("skipped: " + r["skipped"]) if r.get("skipped") else "ERROR: " + r["error"]
        cells = [r["label"], r["mode"], r["pass"], r["impl"]]
        return " ".join(fmt.format(c) for (_, fmt), c in zip(COLUMNS, cells)) + " " + why[:160]
    graph = r.get("graph") or {}
    gcell = _num(graph.get("median_ms")) if "median_ms" in graph else ("fail" if graph.get("error") else "-")
    cells = [
        r["label"], r["mode"], r["pass"], r["impl"], _num(r["eager"]["median_ms"]), gcell,
        _num(None if r.get("peak_bytes") is None else r["peak_bytes"] / MB, "{:.1f}"),
        _num(r["floor_ms"]), _num(r["roofline_frac"] and 100 * r["roofline_frac"], "{:.1f}"),
        _num(r["speedup"].get("base"), "{:.2f}"), _num(r["speedup"].get("plain"), "{:.2f}"),
        _num(r["speedup"].get("compiled"), "{:.2f}"), _num(r.get("rel_err"), "{:.1e}"),
    ]
    return " ".join(fmt.format(c) for (_, fmt), c in zip(COLUMNS, cells))


def table_header() -> str:
    return " ".join(fmt.format(name) for name, fmt in COLUMNS)


# --- the memory table ----------------------------------------------------------------------------

MEMORY_LINEAR = [(s, L, k) for s in (1024, 2048, 4096, 8192) for L, k in ((1, 64), (2, 32), (4, 32), (8, 64))]


def _module_bytes(make) -> Optional[tuple]:
    """(parameter bytes, buffer bytes) of the module ``make(device)`` builds, on meta then on CPU; None if it can't."""
    for device in ("meta", "cpu"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "holds more values than the dense weight": the table says so
                m = make(device)
        except Exception:
            continue
        size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        return size(m.parameters()), size(m.buffers())
    return None


def _layer(name):
    try:
        import panther.nn as pnn
    except Exception:
        return None
    return getattr(pnn, name, None)


def memory_table() -> list:
    """Dense vs sketched layer memory in float32. Buffers (the fixed sketches U) are memory too, counted apart."""
    rows = []
    SKLinear, SKConv2d, RandMHA = _layer("SKLinear"), _layer("SKConv2d"), _layer("RandMultiHeadAttention")

    def add(layer, terms, rank, dense, sketch, source):
        params, buffers = sketch
        rows.append({
            "layer": layer, "num_terms": terms, "low_rank": rank,
            "dense_params_MB": dense / MB, "sketched_params_MB": params / MB, "sketched_buffers_MB": buffers / MB,
            "sketched_total_MB": (params + buffers) / MB,
            "savings_params_only": 1 - params / dense, "savings_with_buffers": 1 - (params + buffers) / dense,
            "source": source,
        })

    for s, L, k in MEMORY_LINEAR:
        dense = 4 * (s * s + s)
        got = SKLinear and _module_bytes(lambda d: SKLinear(s, s, num_terms=L, low_rank=k, device=d))
        analytic = (4 * (L * k * 2 * s + s), 4 * L * k * 2 * s)  # S1s (L,I,k), S2s (L,k,O), bias | U1s, U2s
        add(f"Linear {s}->{s}", L, k, dense, got or analytic, "panther.nn.SKLinear" if got else "analytic")
    C, O, ks, L, k = 64, 128, 3, 1, 16
    got = SKConv2d and _module_bytes(lambda d: SKConv2d(C, O, ks, 1, 1, num_terms=L, low_rank=k, device=d))
    analytic = (4 * (2 * L * k * C * ks * ks + O), 4 * 2 * L * k * O)  # S1s, bias | U1s
    add(f"Conv2d {C}->{O} {ks}x{ks}", L, k, 4 * (O * C * ks * ks + O), got or analytic,
        "panther.nn.SKConv2d" if got else "analytic")
    if RandMHA:
        E, H, m = 512, 8, 64
        got = _module_bytes(lambda d: RandMHA(E, H, m, device=d))
        dense = _module_bytes(lambda d: torch.nn.MultiheadAttention(E, H, device=d))
        if got and dense:
            add(f"MultiheadAttention E={E} H={H} m={m}", None, None, sum(dense), got,
                "panther.nn.RandMultiHeadAttention")
    return rows


def memory_table_text(rows) -> str:
    lines = [f"{'layer':<34} {'L':>2} {'k':>3} {'dense MB':>9} {'sk params MB':>12} {'sk buffers MB':>13} "
             f"{'sk total MB':>11} {'saved (params)':>14} {'saved (all)':>11}  source"]
    for r in rows:
        lines.append(
            f"{r['layer']:<34} {r['num_terms'] or '-':>2} {r['low_rank'] or '-':>3} {r['dense_params_MB']:>9.2f} "
            f"{r['sketched_params_MB']:>12.2f} {r['sketched_buffers_MB']:>13.2f} {r['sketched_total_MB']:>11.2f} "
            f"{r['savings_params_only']:>14.0%} {r['savings_with_buffers']:>11.0%}  {r['source']}"
        )
    return "\n".join(lines)
