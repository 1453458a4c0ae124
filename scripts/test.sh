#!/usr/bin/env bash
# The test suite: installs what it needs, then runs every test (slow ones included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# Debian's chromium renders the SAE report in one test; without it that test is skipped
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "note: could not install chromium; the report-rendering test will be skipped"
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
