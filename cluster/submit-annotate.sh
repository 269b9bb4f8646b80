#!/usr/bin/env bash
# Submit `python -m jobs.annotate ARGS...` to a Ray cluster (options: cluster/submit.sh --help), e.g.
#   RAY_ADDRESS=http://127.0.0.1:8265 cluster/submit-annotate.sh -- /shared/videos/*.mp4 \
#     --out s3://BUCKET/fkp/annotations --model /shared/models/fkp-v1.pt
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/submit.sh" annotate "$@"
