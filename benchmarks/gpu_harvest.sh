#!/usr/bin/env bash
# The whole GPU check, run on a lent GPU machine from the repository root with the wheels of
# benchmarks/gpu_wheels.sh carried in .whl/:
# the CPU-vs-GPU correctness check, then the ViT-L-14 harvest benchmark (8 layers, bf16) with the
# store on tmpfs (the pipeline's own ceiling) and on the local disk. Results go to $OUT (or ./gpu-results).
set -u
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
source benchmarks/gpu_install.sh  # the carried wheels of .whl/ (benchmarks/gpu_wheels.sh)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/harvest_device_check.py --device cuda 2>&1 | grep -v WARNING | tee "$OUT/device_check.txt"
common="--model ViT-L-14 --pretrained none --device cuda --dtype bf16 --batch-size 128 --images 2048 --workers 12 --layers 2,5,8,11,14,17,20,22 --repeats 1"
# most informative first (each run prints its table as it ends; the rest may be cut by a time limit):
# eager, then full batches replayed from a captured CUDA graph (HarvestConfig.cuda_graph), on tmpfs
python3 benchmarks/harvest.py $common --workdir /dev/shm/hb --out "$OUT/harvest_gpu_tmpfs.json" 2>&1 | grep -v WARNING
rm -rf /dev/shm/hb
python3 benchmarks/harvest.py $common --cuda-graph --workdir /dev/shm/hb --out "$OUT/harvest_gpu_tmpfs_graph.json" 2>&1 | grep -v WARNING
rm -rf /dev/shm/hb
# one byte per value: quantised on the device, half the bytes to write
python3 benchmarks/harvest.py $common --cuda-graph --store-dtype fp8 --workdir /dev/shm/hb --out "$OUT/harvest_gpu_tmpfs_fp8_graph.json" 2>&1 | grep -v WARNING
rm -rf /dev/shm/hb
python3 benchmarks/harvest.py $common --cuda-graph --workdir /tmp/hb --out "$OUT/harvest_gpu_disk_graph.json" 2>&1 | grep -v WARNING
rm -rf /tmp/hb
