"""`make demo`: the quick continual-VQA comparison of every method (one seed).

A thin wrapper around ``aim-kernels compare --preset quick``; extra arguments are
passed on (e.g. ``--methods naive,aim --out DIR``). Writes to results/continual-demo
unless ``--out`` is given.
"""
from __future__ import annotations

import sys


def main(argv=None) -> dict:
    from .compare import compare_main
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--out" not in argv:
        argv += ["--out", "results/continual-demo"]
    if "--preset" not in argv:
        argv += ["--preset", "quick"]
    return compare_main(argv)


if __name__ == "__main__":
    main()
