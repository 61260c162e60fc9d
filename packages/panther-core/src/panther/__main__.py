"""``python -m panther info``: every backend found, its version, and whether it can run here."""

import argparse
import platform
import sys


def info(verbose: bool = False) -> int:
    import torch

    import panther
    from panther.backends import BackendError, backend_infos, load_backend
    from panther.backends.registry import AUTO, _selection

    print(f"panther {panther.__version__}  torch {torch.__version__}  python {platform.python_version()}")
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    print(f"device: {cuda}")
    name, source = _selection()
    problem = None
    if name != AUTO:
        try:
            load_backend(name, source=source)
        except BackendError as exc:
            problem = str(exc)
    print(f"selection: {name}" + ("" if name == AUTO else f" ({source})"))
    if problem is not None:
        print(f"error: the selection cannot be used, every op call will fail: {problem}")
    infos = backend_infos()
    if not infos:
        print("no backend found (is panther-randnla-core installed?)")
        return 1
    print(f"{'backend':<10} {'version':<10} {'priority':>8}  {'distribution':<26} status")
    for i in infos:
        reason = i.unavailable_reason
        status = "available" if reason is None else f"unavailable: {reason}"
        prio = str(i.backend.priority) if i.backend else "-"
        print(f"{i.name:<10} {i.version or '?':<10} {prio:>8}  {i.distribution or '?':<26} {status}")
        if verbose and i.load_traceback:
            print(i.load_traceback)
    return 0 if problem is None else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m panther")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="list the backends found and whether they can run here")
    p_info.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of plugins that failed")
    p_info.add_argument("--dispatch", action="store_true",
                        help="also print auto dispatch's cached measurements (key -> fastest backend, times)")
    args = parser.parse_args(argv)
    if args.command == "info":
        status = info(args.verbose)
        if args.dispatch:
            from panther.backends.autotune import cache_report

            print("\n" + cache_report())
        return status
    return 2


if __name__ == "__main__":
    sys.exit(main())
