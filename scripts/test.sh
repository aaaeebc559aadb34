#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite. Without a GPU the Triton kernels
# run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
