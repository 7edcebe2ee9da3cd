"""The ``aim-kernels`` command."""
from __future__ import annotations

import argparse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="aim-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what is built and usable here, and why not")
    demo = sub.add_parser("demo", help="tiny LLaVA, two synthetic tasks (needs transformers)")
    demo.add_argument("args", nargs=argparse.REMAINDER, help="passed to the demo (see --help)")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .diagnostics import report
        print(report())
    else:
        from .continual.demo import main as demo_main
        demo_main(args.args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
