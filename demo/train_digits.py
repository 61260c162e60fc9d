"""Train dense and sketched models on scikit-learn's digits and compare size, accuracy and speed.

    python demo/train_digits.py [--epochs 30] [--out demo-output] [--backend auto]

Models (8x8 grey images, 10 classes; 1437 training and 360 test images, standardised):
  dense MLP      64 -> 512 -> 512 -> 10 with nn.Linear
  sketched MLP   the same widths with panther.nn.SKLinear
  dense CNN      conv 1->16, conv 16->32, 2x2 max-pool, linear 512 -> 10
  sketched CNN   the same with SKConv2d for the second conv and SKLinear for the classifier

Prints a table (parameters, bytes of parameters and of buffers, test accuracy, seconds per epoch, the
Panther backend that ran), writes it as JSON with the per-epoch accuracy curves, plots the curves to a
PNG, and checks the claims of the sketched MLP: at least 90% of the dense MLP's test accuracy with at most
30% of its parameters. Exits with status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

import panther as pr
from panther.backends import select
from panther.nn import SKConv2d, SKLinear
from panther.ops import resolve_padding

ACCURACY_RATIO = 0.90  # sketched MLP test accuracy >= 90% of the dense MLP's
PARAMETER_RATIO = 0.30  # with <= 30% of its parameters


def load_data(seed: int):
    """Standardised digits, split 80/20 (stratified): float32 images (N, 64) and int64 labels."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.2, random_state=seed, stratify=digits.target
    )
    scaler = StandardScaler().fit(x_train)
    to_x = lambda a: torch.tensor(scaler.transform(a), dtype=torch.float32)  # noqa: E731
    to_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return to_x(x_train), to_y(y_train), to_x(x_test), to_y(y_test)


class Images(nn.Module):
    """(N, 64) -> (N, 1, 8, 8)."""

    def forward(self, x):
        return x.view(-1, 1, 8, 8)


def build_models(seed: int) -> Dict[str, nn.Module]:
    """The four models, each built right after ``torch.manual_seed(seed)``; sketched layers get own seeds."""
    builders = {
        "dense MLP": lambda: nn.Sequential(
            nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        ),
        "sketched MLP": lambda: nn.Sequential(
            SKLinear(64, 512, num_terms=1, low_rank=16, seed=seed),
            nn.ReLU(),
            SKLinear(512, 512, num_terms=2, low_rank=16, seed=seed + 1),
            nn.ReLU(),
            SKLinear(512, 10, num_terms=1, low_rank=4, seed=seed + 2),
        ),
        "dense CNN": lambda: nn.Sequential(
            Images(),
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(32 * 4 * 4, 10),
        ),
        "sketched CNN": lambda: nn.Sequential(
            Images(),
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),  # 144 weights: nothing to save by sketching it
            SKConv2d(16, 32, 3, padding=1, num_terms=1, low_rank=8, seed=seed), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            SKLinear(32 * 4 * 4, 10, num_terms=1, low_rank=3, seed=seed + 1),
        ),
    }
    models = {}
    for name, build in builders.items():
        torch.manual_seed(seed)
        models[name] = build()
    return models


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def backends_used(model: nn.Module, x: torch.Tensor) -> str:
    """Ask the registry which backend runs each sketched layer of ``model`` on its actual input for ``x``."""
    names = []

    def probe(module, args):
        (inp,) = args
        if isinstance(module, SKLinear):
            be = select("sketched_linear", inp, module.S1s, module.S2s, module.U1s, module.U2s, module.bias)
        else:
            sym, _ = resolve_padding(module.padding, module.kernel_size, module.stride, module.dilation)
            be = select(
                "sketched_conv2d", inp, module.S1s, module.U1s, module.bias, module.stride, sym, module.dilation
            )
        if be.name not in names:
            names.append(be.name)

    hooks = [m.register_forward_pre_hook(probe) for m in model.modules() if isinstance(m, (SKLinear, SKConv2d))]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for hook in hooks:
            hook.remove()
    return ", ".join(names) if names else "- (torch.nn)"


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def train(name: str, model: nn.Module, data, epochs: int, batch_size: int, lr: float, seed: int):
    """Adam on cross-entropy; returns (test accuracy per epoch, mean seconds per training epoch)."""
    x_train, y_train, x_test, y_test = data
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    shuffle = torch.Generator().manual_seed(seed)
    curve, seconds = [], []
    bar = tqdm(range(epochs), desc=f"{name:>12}", unit="epoch", leave=False)
    for _ in bar:
        model.train()
        start = time.perf_counter()
        for idx in torch.randperm(len(x_train), generator=shuffle).split(batch_size):
            optimizer.zero_grad()
            loss = criterion(model(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
        curve.append(accuracy(model, x_test, y_test))
        bar.set_postfix(loss=f"{loss.item():.3f}", test_acc=f"{curve[-1]:.3f}")
    return curve, sum(seconds) / len(seconds)


def format_table(rows: List[dict]) -> str:
    header = ["model", "parameters", "param bytes", "buffer bytes", "test acc", "s/epoch", "backend"]
    cells = [
        [
            r["model"],
            f"{r['parameters']:,}",
            f"{r['parameter_bytes']:,}",
            f"{r['buffer_bytes']:,}",
            f"{r['test_accuracy']:.4f}",
            f"{r['seconds_per_epoch']:.3f}",
            r["backend"],
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]

    def line(row):  # text columns left-aligned, numbers right-aligned
        return "  ".join(v.ljust(w) if i in (0, 6) else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header).rstrip(), rule] + [line(c).rstrip() for c in cells])


def plot(curves: Dict[str, List[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_title("digits (8x8): dense vs sketched (panther.nn)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def base_parser(doc: str, epochs_help: str) -> argparse.ArgumentParser:
    """The options every digits demo takes (this one and demo/convert_digits.py)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=30, help=epochs_help)
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default: demo-output)")
    p.add_argument("--backend", default="auto", help="Panther backend for the sketched layers (default: auto)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 1e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads, 0 for torch's default (default: 1: these models are too small to gain "
        "from more, and one thread keeps the timings steady on a shared machine)",
    )
    return p


def check_base_args(p: argparse.ArgumentParser, args) -> None:
    """Refuse bad values of the options of :func:`base_parser`, as argparse errors."""
    if args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.backend != "auto":
        try:
            pr.backends.load_backend(args.backend, source="--backend")
        except pr.BackendError as err:
            p.error(str(err))


def run_with_threads(run, args) -> int:
    """``run(args)`` with torch's intra-op threads set to ``--threads``, restored after."""
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def parse_args(argv: Optional[Sequence[str]]):
    p = base_parser(__doc__, "training epochs per model (default: 30)")
    args = p.parse_args(argv)
    check_base_args(p, args)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_with_threads(run, parse_args(argv))


def run(args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    data = load_data(args.seed)
    rows, curves = [], {}
    with pr.use_backend(args.backend):
        for name, model in build_models(args.seed).items():
            curve, per_epoch = train(name, model, data, args.epochs, args.batch_size, args.lr, args.seed)
            curves[name] = curve
            rows.append(
                {
                    "model": name,
                    "parameters": count_parameters(model),
                    "parameter_bytes": nbytes(model.parameters()),
                    "buffer_bytes": nbytes(model.buffers()),
                    "test_accuracy": curve[-1],
                    "seconds_per_epoch": per_epoch,
                    "backend": backends_used(model, data[2][:1]),
                }
            )
    table = format_table(rows)
    print(table)

    dense, sketched = rows[0], rows[1]
    checks = [
        {
            "name": "accuracy",
            "passed": sketched["test_accuracy"] >= ACCURACY_RATIO * dense["test_accuracy"],
            "text": f"sketched MLP test accuracy {sketched['test_accuracy']:.4f} >= {ACCURACY_RATIO:.0%} of the "
            f"dense MLP's {dense['test_accuracy']:.4f} ({ACCURACY_RATIO * dense['test_accuracy']:.4f})",
        },
        {
            "name": "parameters",
            "passed": sketched["parameters"] <= PARAMETER_RATIO * dense["parameters"],
            "text": f"sketched MLP parameters {sketched['parameters']:,} <= {PARAMETER_RATIO:.0%} of the dense "
            f"MLP's {dense['parameters']:,} ({PARAMETER_RATIO * dense['parameters']:,.0f}; it has "
            f"{sketched['parameters'] / dense['parameters']:.1%})",
        },
    ]
    for check in checks:
        print(f"{'PASS' if check['passed'] else 'FAIL'}: {check['text']}")
    stored = (sketched["parameter_bytes"] + sketched["buffer_bytes"]) / dense["parameter_bytes"]
    print(f"note: with its fixed sketches (buffers), the sketched MLP stores {stored:.1%} of the dense MLP's bytes")

    plot(curves, args.out / "accuracy.png")
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "versions": {"torch": torch.__version__, "panther": pr.__version__},
        "rows": rows,
        "checks": checks,
        "passed": all(c["passed"] for c in checks),
        "curves": curves,
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "table.txt").write_text(table + "\n")
    print(f"wrote {args.out / 'results.json'}, {args.out / 'table.txt'} and {args.out / 'accuracy.png'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
