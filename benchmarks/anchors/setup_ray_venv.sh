#!/usr/bin/env bash
# Create (idempotently) the isolated virtualenv that runs the Ray Tune anchor workloads.
#
# Ray is kept out of dtune's own environment so the anchor cannot leak into dtune's imports
# or timings. Re-running is cheap: an existing venv whose `ray.tune` imports at the pinned
# version is left as is.
#
# Usage: bash benchmarks/anchors/setup_ray_venv.sh   (prints the venv's python path last)
# Env:   PYTHON   interpreter used to create the venv (default: python3)
#        RAY_VERSION  pinned Ray release (default: 2.60.0)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$(dirname "$here")/.venv-ray"
ray_version="${RAY_VERSION:-2.60.0}"
py="$venv/bin/python"

installed_version() {
    "$py" -c 'import ray, ray.tune; print(ray.__version__)' 2>/dev/null || true
}

if [[ -x "$py" && "$(installed_version)" == "$ray_version" ]]; then
    echo "ray $ray_version already installed in $venv" >&2
    echo "$py"
    exit 0
fi

if [[ ! -x "$py" ]]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
"$py" -m pip install --quiet --upgrade pip
"$py" -m pip install --quiet "ray[tune]==$ray_version" psutil

echo "installed ray $(installed_version) in $venv" >&2
echo "$py"
