#!/usr/bin/env bash
# vLLM on CUDA behind dynamo-gateway: one prepared check for a machine with an NVIDIA GPU.
# Usage: bash plugins/vllm/gpu_check.sh MODEL_DIR   (a HF model directory; vLLM installed)
# Prints pytest's PASS/FAIL per check and writes gpu_check_vllm.xml (JUnit).
set -euo pipefail
cd "$(dirname "$0")/../.."
model="${1:?usage: gpu_check.sh MODEL_DIR}"
python -c "import torch, vllm; assert torch.cuda.is_available(); print('vllm', vllm.__version__, torch.cuda.get_device_name(0))"
pip install -q -e . -e plugins/vllm pytest pytest-asyncio openai httpx
DYNAMO_GATEWAY_REAL_MODEL="$model" python -m pytest -v -p no:cacheprovider \
    --junitxml=gpu_check_vllm.xml plugins/vllm/tests
