#!/usr/bin/env bash
# Create ./.venv (once) and install torchtitan_ext with its pinned dependencies into it.
# Idempotent: a second run only re-checks the installed versions.
set -euo pipefail
case "${1:-}" in
  -h|--help)
    cat <<'USAGE'
usage: bash scripts/setup_env.sh

Creates ./.venv (once) and installs torch==2.13.0 (the CPU wheel on CPU machines), then
torchtitan_ext with its pinned dependencies and dev tools (pip install -e ".[dev]").
Idempotent: a second run only re-checks the installed versions.

Environment:
  PYTHON   the interpreter that creates the venv (default: python3; 3.10 or newer)
USAGE
    exit 0 ;;
  "") ;;
  *) echo "setup_env.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first and pinned: it resolves to the local CPU wheel on CPU machines
# (an unpinned request would pull the CUDA build and several GB of packages).
.venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[dev]"
echo "environment ready: $(.venv/bin/python -c 'import torch, torchtitan; print("torch", torch.__version__, "| torchtitan", torchtitan.__version__ if hasattr(torchtitan, "__version__") else "0.2.2")')"
