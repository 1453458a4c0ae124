#!/usr/bin/env bash
# The test suite: installs what it needs, then runs every test (slow ones included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
