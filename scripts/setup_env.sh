#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs the project with its test tools, once per pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "is ignored: it is neither" || true
  # clipscope 0.1.8 pins transformers<5 and huggingface-hub<0.26, which sae-lens's own pins exclude;
  # its code runs with today's (our parity tests check that it does)
  .venv/bin/python -m pip install -q --no-deps "clipscope==0.1.8" 2>&1 | grep -v "is ignored: it is neither" || true
  .venv/bin/python -c "import activation_store, zarr, open_clip, torch, sae_lens, clipscope, xarray, tensorstore" # fails loudly if the install did
  rm -f .venv/.installed-*
  touch "$stamp"
fi
