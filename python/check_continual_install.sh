#!/usr/bin/env bash
# A new user's path (issue 12): `pip install .[continual]` into a fresh venv -- torch pinned
# first to the local CPU wheel, never a CUDA build -- then the compare command of the README;
# fails unless the report and every plot were written.
#   python/check_continual_install.sh [WORKDIR]      (EXTRA="--steps 20" to shorten the run)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mkdir -p "${1:-$(mktemp -d)}" && cd "${1:-.}" && pwd)
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q torch==2.13.0
AIM_CUDA=cpu "$WORK/venv/bin/pip" install -q "$ROOT[continual]"
"$WORK/venv/bin/pip" list 2>/dev/null | grep -Ei '^(torch|matplotlib|transformers|peft|pillow|tqdm) '
cd "$WORK"
start=$(date +%s)
AIM_KERNELS_CACHE="$WORK/cache" "$WORK/venv/bin/aim-kernels" compare --preset quick --methods naive \
    --seeds 1 --no-progress --out "$WORK/out" ${EXTRA:-}
for f in acc_matrices.png ap_af.png drift.png contribution.png summary.json report.md; do
    test -s "$WORK/out/$f" || { echo "FAIL: $f not written"; exit 1; }
done
echo "fresh install OK: plots and report in $WORK/out ($(( $(date +%s) - start )) s for compare)"
