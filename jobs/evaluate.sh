#!/usr/bin/env bash
# Ray Job entry point: `cai-ray evaluate` on the cluster the job runs in (RAY_ADDRESS is set by Ray Jobs).
# From the repository root, either
#   cai-ray submit CONFIG [key=value ...] --command evaluate --address http://127.0.0.1:8265
# or with Ray's own CLI:
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- bash jobs/evaluate.sh CONFIG [key=value ...]
set -euo pipefail
exec python -m cai_ray evaluate "$@"
