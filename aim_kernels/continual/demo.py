"""`make demo`: the quick continual-VQA comparison (one seed) of naive, mm-ewc, aim and
joint, two runs at a time (both cores), in under 3 minutes on 2 CPU cores from an empty
cache (the measured time is in the README).

A thin wrapper around ``aim-kernels compare --preset quick --methods naive,mm-ewc,aim,joint
--jobs 2``; extra arguments are passed on and win (e.g. ``--methods naive,aim --out DIR``;
``--methods`` with every method is the full quick preset, ~8 minutes). Writes to
results/continual-demo unless ``--out`` is given.
"""
from __future__ import annotations

import sys

DEFAULTS = {"--out": "results/continual-demo", "--preset": "quick",
            "--methods": "naive,mm-ewc,aim,joint", "--jobs": "2"}


def main(argv=None) -> dict:
    from .compare import compare_main
    argv = list(sys.argv[1:] if argv is None else argv)
    for flag, value in DEFAULTS.items():
        if not any(a == flag or a.startswith(flag + "=") for a in argv):
            argv += [flag, value]
    return compare_main(argv)


if __name__ == "__main__":
    main()
