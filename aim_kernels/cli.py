"""The ``aim-kernels`` command."""
from __future__ import annotations

import argparse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="aim-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what is built and usable here, and why not")
    for name, text in (("demo", "the quick continual-VQA comparison of every method (make demo)"),
                       ("run", "one method on the continual-VQA benchmark (see run --help)"),
                       ("compare", "every method on the continual-VQA benchmark (see compare --help)")):
        sub.add_parser(name, help=text, add_help=False)   # its own parser reads the rest
    args, rest = parser.parse_known_args(argv)
    if args.command == "info" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.args = rest
    if args.command == "info":
        from .diagnostics import report
        print(report())
    elif args.command == "demo":
        from .continual.demo import main as demo_main
        demo_main(args.args)
    elif args.command == "run":
        from .continual.compare import run_main
        run_main(args.args)
    else:
        from .continual.compare import compare_main
        compare_main(args.args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
