#!/usr/bin/env bash
# Ray Job entry point: `cai-ray dpo` on the cluster the job runs in (RAY_ADDRESS is set by Ray Jobs).
# From the repository root, either
#   cai-ray submit CONFIG [key=value ...] --command dpo --address http://127.0.0.1:8265
# or with Ray's own CLI:
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- bash jobs/dpo.sh CONFIG [key=value ...]
set -euo pipefail
exec python -m cai_ray dpo "$@"
