#!/usr/bin/env bash
# Downloads the wheels of benchmarks/gpu_wheels.txt for a lent GPU machine into .whl/ (or $1), here,
# before any device time is spent; then carry them: run(command="bash benchmarks/gpu_harvest.sh",
# carry=[".whl"]). PYV=3.11 fetches the same set for this machine's Python (a local dry run of
# benchmarks/gpu_install.sh). Fails when the set would not fit the carry limit (64 MiB).
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
PYV=${PYV:-3.12}
DEST=${1:-.whl}
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download -q --only-binary=:all: --no-deps --python-version "$PYV" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$DEST" $(grep -v '^\s*#' benchmarks/gpu_wheels.txt | grep -v '^\s*$' \
                 | { if [ "$PYV" = 3.12 ]; then cat; else sed 's/^numcodecs==.*/numcodecs==0.16.6/'; fi; })
# (numcodecs 0.17 needs Python 3.12; a dry run on 3.11 gets 0.16.6, the version the test suite runs)
size=$(du -sb "$DEST" | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "$(ls "$DEST" | wc -l) wheels in $DEST: $((size / 1048576)) MiB, with the working tree $(((size + tree) / 1048576)) MiB (carry limit 64 MiB)"
if [ "$PYV" = 3.12 ] && [ $((size + tree)) -gt $((64 * 1048576)) ]; then
    echo "gpu_wheels: $DEST and the working tree are over 64 MiB together: they would not fit a carry" >&2
    exit 1
fi
