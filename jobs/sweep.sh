#!/usr/bin/env bash
# Ray Job entry point: `cai-ray sweep` on the cluster the job runs in (RAY_ADDRESS is set by Ray Jobs).
# From the repository root, either
#   cai-ray submit CONFIG [key=value ...] --command sweep --address http://127.0.0.1:8265
# or with Ray's own CLI:
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- bash jobs/sweep.sh CONFIG [key=value ...]
set -euo pipefail
exec python -m cai_ray sweep "$@"
