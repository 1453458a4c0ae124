#!/usr/bin/env bash
# The SAE GPU check, run on a lent GPU machine from the repository root with the wheels of
# benchmarks/gpu_wheels.sh carried in .whl/:
# our training step against a dense TopK step at CLIP-Scope's sizes, then the trainer end to end
# on a store on the local disk against its bare step. Results go to $OUT (or ./gpu-results).
set -u
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
source benchmarks/gpu_install.sh  # the carried wheels of .whl/ (benchmarks/gpu_wheels.sh)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/sae_train.py --device cuda --d-in 1024 --latents 16384,65536 --batch-size 4096 --steps 20 \
    --out "$OUT/sae_train_gpu.json" 2>&1 | grep -v WARNING
python3 benchmarks/train_end_to_end.py --device cuda --d-model 1024 --latents 65536 --batch-size 4096 \
    --images 4096 --tokens 10000000 --workdir /tmp/e2e --out "$OUT/train_end_to_end_gpu.json" 2>&1 \
    | grep -v "WARNING\|it/s\|tok/s\]"
