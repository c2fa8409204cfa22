#!/usr/bin/env bash
# The decode benchmark at real shapes in one command, on one H100/H200, within 8 minutes (see
# benchmarks/decode_shapes.py): Llama-3.2-1B and Qwen3-8B shapes, random bf16 weights, 8k-32k contexts, batch
# 1/8/32; HF DynamicCache, HF StaticCache + torch.compile and our dense step against DMS-8 (forced, trained-like).
# Writes OUT/decode.md, OUT/decode.jsonl and OUT/log.txt. Needs torch (CUDA), transformers and Triton; nothing is
# downloaded (the package is read from src/).
#
#   benchmarks/gpu_decode.sh OUT [decode.py options, e.g. --budget 300]
#   KVSHRINK_SMOKE=1 benchmarks/gpu_decode.sh OUT     # the rehearsal: the same sweep in miniature on the CPU
set -euo pipefail
out=${1:?usage: benchmarks/gpu_decode.sh OUT [decode.py options]}
shift
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -n "${KVSHRINK_SMOKE:-}" ]; then
  mode=(--smoke --threads 1 --compile-backend eager --budget 150)
else
  mode=(--device cuda --budget 430)
fi
# the sweep stops itself at --budget; the timeout is a backstop (SIGINT first: rows already written stay)
timeout -s INT -k 20 460 "${PYTHON:-python3}" benchmarks/decode.py "${mode[@]}" --out "$out" "$@" 2>&1 | tee -a "$out/log.txt"
