#!/usr/bin/env bash
# Submit `python -m jobs.train ARGS...` to a Ray cluster (options: cluster/submit.sh --help), e.g.
#   RAY_ADDRESS=http://127.0.0.1:8265 cluster/submit-train.sh -- --data course:/shared/data/fkp \
#     --storage s3://BUCKET/fkp/checkpoints --output /shared/models --name fkp-v1
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/submit.sh" train "$@"
