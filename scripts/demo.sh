#!/usr/bin/env bash
# The built-in demo: installs what it needs, then runs `actstore demo` into out/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/actstore demo --out "${1:-out/demo}"
