#!/usr/bin/env bash
# Submit one of the project's jobs to a running Ray cluster with `ray job submit`; the thin
# wrappers submit-train.sh and submit-annotate.sh call this. Everything after the options goes
# to `python -m jobs.JOB` unchanged.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<USAGE
Usage: cluster/submit-JOB.sh [options] [--] JOB-ARGS...
       cluster/submit.sh JOB [options] [--] JOB-ARGS...      (JOB: train or annotate)

Runs, from the project root (so that the runtime env's working_dir "." uploads this project):
  ray job submit --address URL --runtime-env FILE [...] -- python -m jobs.JOB JOB-ARGS...

Options:
  -a, --address URL       the cluster's dashboard / jobs API (default: \$RAY_ADDRESS), e.g.
                          http://127.0.0.1:8265 through \`ray dashboard cluster/aws.yaml\` or
                          \`kubectl port-forward svc/fkp-head-svc 8265\`
  -e, --runtime-env FILE  runtime env YAML (default: \$FKP_RUNTIME_ENV, else
                          cluster/runtime_env.yaml; cluster/runtime_env.local.yaml for a
                          cluster from cluster/local-up.sh)
      --submission-id ID  the job's id (default: one Ray makes up)
      --no-wait           return once submitted (default: follow the logs until the job ends)
  -h, --help              this text

Paths in JOB-ARGS are opened on the cluster, not here: --out / --storage want shared storage
(s3://... or a mount that every node has), and inputs must be readable on every node.
Follow a job with \`ray job logs -f ID --address URL\`, or on the dashboard (URL above).
USAGE
}

die() { echo "submit: $*" >&2; exit 2; }

JOB="${1:-}"
case "$JOB" in
  train|annotate) shift ;;
  -h|--help) usage; exit 0 ;;
  *) usage >&2; die "the first argument must name the job: train or annotate" ;;
esac

ADDRESS="${RAY_ADDRESS:-}"
RUNTIME_ENV="${FKP_RUNTIME_ENV:-cluster/runtime_env.yaml}"
declare -a EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    -a|--address) ADDRESS="${2:?$1 needs a value}"; shift 2 ;;
    -e|--runtime-env) RUNTIME_ENV="${2:?$1 needs a value}"; shift 2 ;;
    --submission-id) EXTRA+=(--submission-id "${2:?$1 needs a value}"); shift 2 ;;
    --no-wait) EXTRA+=(--no-wait); shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;   # the first argument that is not ours starts the job's own
  esac
done

[ -n "$ADDRESS" ] || die "no cluster address: pass --address http://HOST:8265 or set RAY_ADDRESS"
case "$ADDRESS" in
  http://*|https://*) ;;
  *) die "the address must be the dashboard's http(s):// URL (the jobs API), got '$ADDRESS'" ;;
esac

# Resolve the runtime env before moving to the project root (a relative path names a file here).
if [ -f "$RUNTIME_ENV" ]; then
  RUNTIME_ENV="$(cd "$(dirname "$RUNTIME_ENV")" && pwd)/$(basename "$RUNTIME_ENV")"
elif [ -f "$ROOT/$RUNTIME_ENV" ]; then
  RUNTIME_ENV="$ROOT/$RUNTIME_ENV"
else
  die "runtime env file not found: $RUNTIME_ENV"
fi
cd "$ROOT"   # working_dir "." in the runtime env means this project

if ! command -v ray >/dev/null && [ -x "$ROOT/.venv/bin/ray" ]; then
  export PATH="$ROOT/.venv/bin:$PATH"
fi
command -v ray >/dev/null || die "no 'ray' on PATH (activate the project's venv)"
# The client must speak the cluster's auth mode (see cluster/runtime_env.yaml).
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"

exec ray job submit --address "$ADDRESS" --runtime-env "$RUNTIME_ENV" ${EXTRA[@]+"${EXTRA[@]}"} \
  -- python -m "jobs.$JOB" "$@"
