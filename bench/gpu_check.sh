#!/usr/bin/env bash
# The GPU code paths on a bare GPU machine: PyTorch, transformers and peft, no Ray, vLLM, DeepSpeed
# or MLflow, nothing downloaded; see bench/gpu_check.py.  Runs on CPU too (--device cpu, or no GPU).
#   bash bench/gpu_check.sh --vendor     # here: copy omegaconf (+ antlr4), pure Python ~1 MB, into
#                                        # bench/.vendor for a machine that lacks it
#   bash bench/gpu_check.sh [--device cuda|cpu] [--size tiny|small] [--steps N]
set -euo pipefail
cd "$(dirname "$0")/.."
VENDOR="$PWD/bench/.vendor"
if [[ "${1:-}" == "--vendor" ]]; then
  rm -rf "$VENDOR" && mkdir -p "$VENDOR"
  for pkg in omegaconf antlr4; do
    cp -r "$(python -c "import $pkg, os; print(os.path.dirname($pkg.__file__))")" "$VENDOR/"
  done
  du -sh "$VENDOR"
  exit 0
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python -c "import omegaconf" 2>/dev/null; then
  [[ -d "$VENDOR" ]] || { echo "omegaconf is not installed and $VENDOR is missing: run 'bash bench/gpu_check.sh --vendor' where it is installed" >&2; exit 2; }
  export PYTHONPATH="$PYTHONPATH:$VENDOR"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout "${GPU_CHECK_TIMEOUT_S:-480}" python bench/gpu_check.py "$@"
