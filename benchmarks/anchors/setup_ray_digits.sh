#!/usr/bin/env bash
# Add what the MLP-on-digits problem of search_quality.py needs to the Ray anchor's virtualenv:
# the CPU build of torch (pinned like dtune's own) and scikit-learn (for load_digits). Idempotent.
#
# Usage: bash benchmarks/anchors/setup_ray_digits.sh   (prints the venv's python path last)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="$(bash "$here/setup_ray_venv.sh" | tail -n 1)"
if ! "$py" -c 'import torch, sklearn' 2>/dev/null; then
    "$py" -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}" scikit-learn
    echo "installed torch and scikit-learn in $(dirname "$(dirname "$py")")" >&2
fi
echo "$py"
