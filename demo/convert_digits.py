"""Convert trained dense models on scikit-learn's digits to sketched ones, then fine-tune them.

    python demo/convert_digits.py [--epochs 30] [--finetune-epochs 5] [--budget 0.3] [--out demo-output]

Trains the dense MLP and the dense CNN of demo/train_digits.py (same data, models and training loop),
converts each with panther.nn.convert to at most --budget of its parameters, with three initialisations of
the sketched layers:
  unbiased     S1 = W U1ᵀ, S2 = U2ᵀ W: right in expectation over the sketches
  optimal      least-squares fit of the dense weight for the drawn sketches (the default)
  calibrated   least-squares fit of each layer's outputs on the training images
reports the test accuracy right after conversion (no training), then fine-tunes each converted model for
--finetune-epochs. Prints a table, writes it with the curves as JSON, and plots the fine-tuning curves.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

import panther as pr
from panther.nn import convert

INITS = ("unbiased", "optimal", "calibrated")


def _load_sibling(name: str):
    """demo/<name>.py as a module (the demos are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_digits = _load_sibling("train_digits")


def convert_model(model, init: str, budget: float, x_train, seed: int):
    """``model`` converted to at most ``budget`` of its parameters with the given initialisation."""
    kwargs = dict(param_budget=budget, seed=seed)
    if init == "calibrated":
        kwargs["calibration_data"] = x_train.split(256)
    else:
        kwargs["init"] = init
    return convert(model, **kwargs)


def format_table(rows: List[dict], finetune_epochs: int) -> str:
    header = ["model", "init", "parameters", "of dense", "acc converted", f"acc +{finetune_epochs} epochs"]
    cells = [
        [
            r["model"],
            r["init"],
            f"{r['parameters']:,}",
            f"{r['parameter_fraction']:.1%}",
            f"{r['accuracy_converted']:.4f}",
            "-" if r["accuracy_finetuned"] is None else f"{r['accuracy_finetuned']:.4f}",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]

    def line(row):  # text columns left-aligned, numbers right-aligned
        return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header).rstrip(), rule] + [line(c).rstrip() for c in cells])


def plot(curves: Dict[str, Dict[str, List[float]]], dense: Dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.2), squeeze=False)
    for ax, (model, by_init) in zip(axes[0], curves.items()):
        for init, curve in by_init.items():
            ax.plot(range(len(curve)), curve, marker="o", markersize=3, label=f"{init} init")
        ax.axhline(dense[model], color="black", linestyle="--", linewidth=1, label="dense")
        ax.set_title(f"{model}: converted, then fine-tuned")
        ax.set_xlabel("fine-tuning epoch (0 = right after conversion)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Optional[Sequence[str]]):
    p = train_digits.base_parser(__doc__, "training epochs of the dense models (default: 30)")
    p.add_argument("--finetune-epochs", type=int, default=5, help="fine-tuning epochs after conversion (default: 5)")
    p.add_argument("--budget", type=float, default=0.3, help="fraction of the dense parameters kept (default: 0.3)")
    args = p.parse_args(argv)
    train_digits.check_base_args(p, args)
    if args.finetune_epochs < 0:
        p.error(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
    if not 0.0 < args.budget < 1.0:
        p.error(f"--budget must be a fraction in (0, 1), got {args.budget}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    return train_digits.run_with_threads(run, parse_args(argv))


def run(args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    data = train_digits.load_data(args.seed)
    x_train, _, x_test, y_test = data
    models = train_digits.build_models(args.seed)
    rows, curves, dense_accuracy, reports = [], {}, {}, {}
    with pr.use_backend(args.backend):
        for name in ("dense MLP", "dense CNN"):
            dense = models[name]
            train_digits.train(name, dense, data, args.epochs, args.batch_size, args.lr, args.seed)
            label = name.replace("dense ", "")
            dense_accuracy[label] = train_digits.accuracy(dense, x_test, y_test)
            dense_params = train_digits.count_parameters(dense)
            rows.append(dict(model=label, init="dense", parameters=dense_params, parameter_fraction=1.0,
                             accuracy_converted=dense_accuracy[label], accuracy_finetuned=None))
            curves[label] = {}
            for init in INITS:
                model, report = convert_model(dense, init, args.budget, x_train, args.seed)
                reports[f"{label} {init}"] = str(report)
                start = train_digits.accuracy(model, x_test, y_test)
                tuned = copy.deepcopy(model)
                curve = []
                if args.finetune_epochs:
                    curve, _ = train_digits.train(
                        f"{label} {init}", tuned, data, args.finetune_epochs, args.batch_size, args.lr, args.seed
                    )
                curves[label][init] = [start] + curve
                rows.append(dict(
                    model=label, init=init, parameters=report.params_after,
                    parameter_fraction=report.params_after / dense_params, accuracy_converted=start,
                    accuracy_finetuned=curve[-1] if curve else None,
                ))
    print(reports["MLP calibrated"])
    print()
    table = format_table(rows, args.finetune_epochs)
    print(table)

    plot(curves, dense_accuracy, args.out / "convert_accuracy.png")
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "versions": {"torch": torch.__version__, "panther": pr.__version__},
        "rows": rows,
        "curves": curves,
        "reports": reports,
    }
    (args.out / "convert_results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "convert_table.txt").write_text(table + "\n")
    print(
        f"wrote {args.out / 'convert_results.json'}, {args.out / 'convert_table.txt'} and "
        f"{args.out / 'convert_accuracy.png'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
