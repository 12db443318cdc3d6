#!/usr/bin/env bash
# Every check that needs a GPU, in one command (scripts/gpu_check.py: the checks, --list, --only).
# Run in the project root of a GPU machine; with .gpu/ (../shared/gpu/prepare.sh, carried with
# the working tree) its env.sh installs TorchTitan's wheels and sets PYTHONPATH first.
# Without CUDA it prints one line and exits 3. Never part of CI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -f .gpu/env.sh ]]; then
  # shellcheck disable=SC1091
  source .gpu/env.sh >&2
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
python=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || command -v python3 )}
exec "$python" scripts/gpu_check.py "$@"
