#!/usr/bin/env bash
# Installs what agora needs into ~/.cache/agora (idempotent: a second run is a no-op).
#
#   scripts/setup.sh          libtorch for the Rust build (torch wheel without deps + CUDA runtime stubs)
#   scripts/setup.sh --test   also the full torch wheel and `transformers`, for Python-side compatibility tests
#
# AGORA_CUDA=1 installs the full CUDA build of torch even without --test (for GPU machines).
set -euo pipefail

TORCH_VERSION=2.13.0
CACHE="${AGORA_CACHE:-$HOME/.cache/agora}"
VENV="$CACHE/venv"
PY="${PYTHON:-python3}"
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

mkdir -p "$CACHE"
if [ ! -x "$VENV/bin/python" ]; then
  echo "agora setup: creating venv $VENV" >&2
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

stamp_base="$CACHE/.torch-$TORCH_VERSION-base"
stamp_full="$CACHE/.torch-$TORCH_VERSION-full"
stamp_test="$CACHE/.test-deps-v2"

if [ "$want_test" = 1 ] || [ "${AGORA_CUDA:-0}" = 1 ]; then
  if [ ! -f "$stamp_full" ]; then
    echo "agora setup: installing torch==$TORCH_VERSION (full wheel)" >&2
    pip install "torch==$TORCH_VERSION"
    touch "$stamp_full" "$stamp_base"
  fi
fi
if [ ! -f "$stamp_base" ]; then
  echo "agora setup: installing torch==$TORCH_VERSION (libtorch only, --no-deps) and CUDA runtime wheels" >&2
  pip install --no-deps "torch==$TORCH_VERSION"
  # libtorch_cpu links against these two even on CPU-only machines.
  # (versions: torch 2.13.0's cuda-toolkit==13.0.3 pins these.)
  pip install --no-deps "nvidia-cuda-runtime==13.0.96.*" "nvidia-cuda-cupti==13.0.85.*"
  touch "$stamp_base"
fi
if [ "$want_test" = 1 ] && [ ! -f "$stamp_test" ]; then
  echo "agora setup: installing test dependencies (transformers, safetensors, numpy, pyarrow, pytest)" >&2
  pip install "transformers>=4.45" safetensors numpy pyarrow tokenizers pytest
  touch "$stamp_test"
fi
