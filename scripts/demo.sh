#!/usr/bin/env bash
# Set up (scripts/setup.sh) and print the correctness + speed report for this machine's device.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m rotary_kernels.demo "$@"
