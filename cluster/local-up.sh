#!/usr/bin/env bash
# Start a real multi-node Ray cluster on ONE machine: a head node plus N worker nodes, each its
# own `ray start` (own raylet, own CPU count, own dashboard agent), under one temp dir, on pinned
# ports, with authentication disabled. Stop it with cluster/local-down.sh (never `ray stop`: that kills
# every Ray process of the host, other people's included).
#
# Used for trying the cluster routes (`ray job submit`, cluster/submit-*.sh) without a cloud, and
# by tests/test_cluster.py. Writes a state file (ports, PIDs, session ids, temp dir) that
# local-down.sh reads, and prints RAY_ADDRESS / the dashboard URL.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<EOF
Usage: cluster/local-up.sh [options]

Start a Ray head plus N worker nodes on this machine, auth disabled. The dashboard listens on
127.0.0.1 only, but Ray advertises the host's IP and the GCS listens on every interface (Ray
turns a 127.0.0.1 node address into the host IP): use it on a trusted or firewalled host.

Options:
  -w, --workers N         worker nodes besides the head (default: 1)
  -c, --cpus N            CPUs each node offers, head included (default: 1)
      --head-cpus N       CPUs of the head node (default: --cpus)
      --worker-gpus N     GPUs each worker node offers (default: 0; the head never gets one)
      --object-store-mb M object store per node, MiB (default: 200)
  -p, --base-port P       first pinned port (default: 26379), see "Ports" below
  -t, --temp-dir DIR      Ray temp dir (default: /tmp/fkp-cluster-\$UID-P). Keep it short: Ray
                          puts unix sockets under it and their paths are limited to 107 bytes
  -s, --state FILE        state file to write (default: DIR/local-cluster.env)
      --timeout S         seconds to wait for the nodes to come up (default: 180)
  -h, --help              this text

Ports:
  P       GCS (ray.init(address="127.0.0.1:P"))
  P+1     dashboard and job submission (RAY_ADDRESS=http://127.0.0.1:P+1)
  P+2     Ray client server (ray://127.0.0.1:P+2)
  P+10+i  dashboard agent of node i (head = 0); every agent defaults to 52365, so two Ray
          instances on one host clash ("500: No available agent") unless this is pinned
  P+100+100*i .. +99   worker process ports of node i
The defaults stay below 32768, out of Linux's ephemeral range, so that no random port of
another program can take one of them between the check and the start.

Environment: the venv (\$FKP_VENV, else \$VIRTUAL_ENV, else $ROOT/.venv) is put first on PATH,
because a job's entrypoint \`python\` is the one on the PATH that \`ray start\` saw.
EOF
}

die() { echo "local-up: $*" >&2; exit 1; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

WORKERS=1 CPUS=1 HEAD_CPUS="" WORKER_GPUS=0 OBJECT_STORE_MB=200 BASE_PORT=26379
TEMP_DIR="" STATE="" TIMEOUT=180
while [ $# -gt 0 ]; do
  case "$1" in
    -w|--workers) WORKERS="${2:?$1 needs a value}"; shift 2 ;;
    -c|--cpus) CPUS="${2:?$1 needs a value}"; shift 2 ;;
    --head-cpus) HEAD_CPUS="${2:?$1 needs a value}"; shift 2 ;;
    --worker-gpus) WORKER_GPUS="${2:?$1 needs a value}"; shift 2 ;;
    --object-store-mb) OBJECT_STORE_MB="${2:?$1 needs a value}"; shift 2 ;;
    -p|--base-port) BASE_PORT="${2:?$1 needs a value}"; shift 2 ;;
    -t|--temp-dir) TEMP_DIR="${2:?$1 needs a value}"; shift 2 ;;
    -s|--state) STATE="${2:?$1 needs a value}"; shift 2 ;;
    --timeout) TIMEOUT="${2:?$1 needs a value}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
HEAD_CPUS="${HEAD_CPUS:-$CPUS}"
for v in WORKERS CPUS HEAD_CPUS WORKER_GPUS OBJECT_STORE_MB BASE_PORT TIMEOUT; do
  is_uint "${!v}" || die "$v must be a non-negative integer, got '${!v}'"
done
[ "$OBJECT_STORE_MB" -ge 80 ] || die "--object-store-mb must be >= 80 (Ray's minimum is 75 MiB)"
[ "$BASE_PORT" -ge 1024 ] && [ $((BASE_PORT + 200 + 100 * WORKERS)) -le 65535 ] || die "--base-port out of range"

TEMP_DIR="${TEMP_DIR:-/tmp/fkp-cluster-$(id -u)-$BASE_PORT}"
mkdir -p "$TEMP_DIR"
TEMP_DIR="$(cd "$TEMP_DIR" && pwd -P)"   # absolute and without symlinks: local-down matches on it
[[ "$TEMP_DIR" =~ ^[A-Za-z0-9/._-]+$ ]] || die "--temp-dir $TEMP_DIR: use letters, digits, '/', '.', '_', '-' only"
# session_<date>_<time>_<usec>_<pid>/sockets/plasma_store is appended to it (~66 bytes)
[ ${#TEMP_DIR} -le 40 ] || die "--temp-dir $TEMP_DIR is ${#TEMP_DIR} bytes: keep it <= 40 (unix socket paths are limited to 107 bytes)"
STATE="${STATE:-$TEMP_DIR/local-cluster.env}"
LOG_DIR="$TEMP_DIR/local-up"
mkdir -p "$LOG_DIR" "$(dirname "$STATE")"
[ ! -s "$STATE" ] || die "$STATE exists: a cluster may already run there (cluster/local-down.sh --state $STATE)"

VENV="${FKP_VENV:-${VIRTUAL_ENV:-$ROOT/.venv}}"
if [ -x "$VENV/bin/python" ]; then
  export PATH="$VENV/bin:$PATH"
fi
command -v ray >/dev/null || die "no 'ray' on PATH (activate the project's venv or set FKP_VENV)"
PYTHON="$(command -v python)"

# Every process of ours (and every client of this cluster) must agree on the auth mode: a plain
# ray.init() elsewhere turns token auth on, and then clients given an explicit address fail.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
export RAY_USAGE_STATS_ENABLED=0

GCS_PORT=$BASE_PORT
DASHBOARD_PORT=$((BASE_PORT + 1))
CLIENT_PORT=$((BASE_PORT + 2))
agent_port() { echo $((BASE_PORT + 10 + $1)); }
min_worker_port() { echo $((BASE_PORT + 100 + 100 * $1)); }

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$GCS_PORT" "$DASHBOARD_PORT" "$CLIENT_PORT" $(for i in $(seq 0 "$WORKERS"); do agent_port "$i"; done); do
  ! port_in_use "$p" || die "port $p is in use on 127.0.0.1: pick another --base-port"
done

node_flags() {  # node index -> NODE_FLAGS, the flags every node gets
  local i=$1
  NODE_FLAGS=(--temp-dir="$TEMP_DIR" --disable-usage-stats
    --dashboard-agent-listen-port="$(agent_port "$i")"
    --min-worker-port="$(min_worker_port "$i")" --max-worker-port=$(($(min_worker_port "$i") + 99))
    --object-store-memory=$((OBJECT_STORE_MB * 1024 * 1024)))
}

# Each `ray start` runs in a new session (setsid): every daemon it forks inherits that session id
# and keeps it when it is reparented, so local-down.sh can find exactly these processes later.
# stdin/stdout/stderr go to a file: daemons inherit them, and a caller reading our output through
# a pipe would otherwise wait for the cluster to stop before seeing end-of-file.
start_node() {  # name, args...
  local name=$1; shift
  setsid ray start "$@" </dev/null >"$LOG_DIR/$name.log" 2>&1
}

wait_until() {  # seconds, command...: until the command succeeds (1 if it never does)
  local limit=$1; shift
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.5
  done
}

alive_nodes() {  # prints the number of ALIVE nodes the dashboard knows
  curl -fsS --max-time 5 "http://127.0.0.1:$DASHBOARD_PORT/nodes?view=summary" |
    "$PYTHON" -c 'import json,sys; d=json.load(sys.stdin)["data"]["summary"]; print(sum(1 for n in d if n["raylet"]["state"]=="ALIVE"))'
}
nodes_up() { [ "$(alive_nodes)" -ge $((WORKERS + 1)) ]; }
agent_up() { curl -s -o /dev/null --max-time 5 "http://127.0.0.1:$1/"; }  # any HTTP answer will do

fail_with_logs() {
  echo "local-up: $*" >&2
  for f in "$LOG_DIR"/*.log; do echo "--- $f" >&2; tail -n 30 "$f" >&2; done
  echo "local-up: processes started so far are still running: cluster/local-down.sh --state $STATE" >&2
  write_state
  exit 1
}

MY_SID="$(ps -o sid= -p $$ | tr -d ' ')"
cluster_sids() {  # session ids of the processes whose command line names our temp dir (not ours: awk's names it too)
  ps -eww -o sid=,args= | awk -v d="$TEMP_DIR" -v me="$MY_SID" 'index($0, d) && $1 != me { print $1 }' | sort -nu
}
session_pids() {  # every process in those sessions (the reparented ray.util.client.server among them)
  ps -e -o pid=,sid= | awk -v s=" $* " 'index(s, " " $2 " ") { print $1 }' | sort -n
}

write_state() {
  local pids sids
  sids="$(cluster_sids | tr '\n' ' ')"
  # shellcheck disable=SC2086
  pids="$(session_pids $sids | tr '\n' ' ')"
  cat >"$STATE.tmp" <<EOF
# written by cluster/local-up.sh on $(date -Is); read by cluster/local-down.sh
TEMP_DIR=$TEMP_DIR
GCS_ADDRESS=127.0.0.1:$GCS_PORT
GCS_PORT=$GCS_PORT
DASHBOARD_PORT=$DASHBOARD_PORT
CLIENT_PORT=$CLIENT_PORT
AGENT_PORTS=$(for i in $(seq 0 "$WORKERS"); do printf '%s ' "$(agent_port "$i")"; done)
RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
DASHBOARD_URL=http://127.0.0.1:$DASHBOARD_PORT
RAY_AUTH_MODE=$RAY_AUTH_MODE
PYTHON=$PYTHON
NODES=$((WORKERS + 1))
SIDS=$sids
PIDS=$pids
EOF
  mv "$STATE.tmp" "$STATE"
}

started=$SECONDS
node_flags 0
start_node head --head --port="$GCS_PORT" --num-cpus="$HEAD_CPUS" --num-gpus=0 \
  --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
  --ray-client-server-port="$CLIENT_PORT" "${NODE_FLAGS[@]}" ||
  fail_with_logs "head node failed to start"

# Worker nodes in parallel (each one mostly waits on the head). --num-gpus is always given:
# left out, every node of this machine would claim all of its GPUs.
declare -a worker_pids=()
for i in $(seq 1 "$WORKERS"); do
  node_flags "$i"
  start_node "worker-$i" --address="127.0.0.1:$GCS_PORT" --num-cpus="$CPUS" --num-gpus="$WORKER_GPUS" "${NODE_FLAGS[@]}" &
  worker_pids+=("$!")
done
for i in "${!worker_pids[@]}"; do
  wait "${worker_pids[$i]}" || fail_with_logs "worker node $((i + 1)) failed to start"
done

left=$((TIMEOUT - (SECONDS - started))); [ $left -gt 5 ] || left=5
wait_until "$left" nodes_up || fail_with_logs "fewer than $((WORKERS + 1)) nodes alive after ${TIMEOUT}s"
# Job submission goes through the head's dashboard agent; runtime envs through each node's.
for i in $(seq 0 "$WORKERS"); do
  left=$((TIMEOUT - (SECONDS - started))); [ $left -gt 5 ] || left=5
  wait_until "$left" agent_up "$(agent_port "$i")" || fail_with_logs "dashboard agent of node $i (port $(agent_port "$i")) not answering"
done
write_state

cat <<EOF
Ray cluster up in $((SECONDS - started)) s: head + $WORKERS worker node(s), $HEAD_CPUS/$CPUS CPUs per node, temp dir $TEMP_DIR
  export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT RAY_AUTH_MODE=$RAY_AUTH_MODE
  dashboard:   http://127.0.0.1:$DASHBOARD_PORT
  ray.init():  address="127.0.0.1:$GCS_PORT"
  submit:      cluster/submit-train.sh --runtime-env cluster/runtime_env.local.yaml -- --data course:/abs/path ...
  stop:        cluster/local-down.sh --state $STATE
EOF
