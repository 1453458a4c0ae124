# Sourced by benchmarks/gpu_harvest.sh and gpu_sae.sh on a lent GPU machine: installs the carried
# wheels of .whl/ (benchmarks/gpu_wheels.sh) into /tmp/site, then checks in seconds that everything
# the checks import is importable, so a missing wheel costs seconds of device time, not minutes.
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
PY=${PY:-python3}
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_install: no wheels in $WHEELS; run 'bash benchmarks/gpu_wheels.sh' here and carry .whl" >&2
    exit 1
fi
wheels=$(ls "$WHEELS"/*.whl)
for pair in torchvision:torchvision PIL:pillow; do  # the machine's own (torchvision built for its torch) first
    if "$PY" -c "import ${pair%%:*}" 2>/dev/null; then
        wheels=$(echo "$wheels" | grep -v "/${pair##*:}-")
    fi
done
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $wheels || exit 1
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
"$PY" - <<'PY' || exit 1
import importlib, sys
import torch
missing = []
for m in ("numpy", "PIL", "torchvision", "open_clip", "zarr", "numcodecs", "pyarrow", "crc32c",
          "activation_store.harvest.run", "activation_store.readers", "activation_store.sae.trainer"):
    try:
        importlib.import_module(m)
    except Exception as exc:  # noqa: BLE001 - every missing piece named at once
        missing.append(f"{m} ({type(exc).__name__}: {exc})")
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.cuda.is_available()}")
if missing:
    sys.exit("gpu_install: cannot import " + "; ".join(missing))
PY
