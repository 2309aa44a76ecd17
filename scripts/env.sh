# Source this to build or test agora by hand:  . scripts/env.sh
# Points the tch build at the libtorch that scripts/setup.sh installed (no `import torch` needed).
AGORA_CACHE="${AGORA_CACHE:-$HOME/.cache/agora}"
export AGORA_CACHE
export AGORA_VENV="$AGORA_CACHE/venv"
_agora_torch=$(ls -d "$AGORA_VENV"/lib/python3*/site-packages/torch 2>/dev/null | head -n 1)
if [ -z "$_agora_torch" ]; then
  echo "agora: no torch under $AGORA_VENV; run scripts/setup.sh first" >&2
  return 1 2>/dev/null || exit 1
fi
export LIBTORCH="$_agora_torch"
export LIBTORCH_CXX11_ABI=1
# Test binaries of the library crates find libtorch through this; the `agora` binary carries an rpath.
export LD_LIBRARY_PATH="$_agora_torch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export AGORA_PYTHON="$AGORA_VENV/bin/python"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$AGORA_CACHE/target}"
unset _agora_torch
