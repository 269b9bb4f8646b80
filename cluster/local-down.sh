#!/usr/bin/env bash
# Stop the one-machine cluster that cluster/local-up.sh started, and nothing else.
#
# Never `ray stop`: it kills every Ray process of the host (other clusters, other people's test
# sessions). Instead this script finds the processes of *this* cluster from its state file:
#   - every Ray process in the sessions local-up.sh created (each `ray start` ran under setsid;
#     a session id survives reparenting, so the ray.util.client.server process, which is
#     reparented to PID 1 and names the GCS port but not the temp dir, is found too);
#   - any Ray process whose command line names the cluster's temp dir;
#   - job drivers: `ray job submit` entrypoints run in sessions of their own, so they are found
#     as descendants of the processes above, or by RAY_ADDRESS=<ip>:<GCS port> in their
#     environment, or by a working directory under the temp dir (runtime_env working_dir);
#   - every descendant of all of these.
# Then SIGTERM, a grace period, SIGKILL for what is left, and a check that all are gone.
set -euo pipefail

usage() {
  cat <<EOF
Usage: cluster/local-down.sh [options]

Stop the processes of a cluster started by cluster/local-up.sh (and only those).

Options:
  -s, --state FILE   the state file local-up.sh wrote (default: TEMP_DIR/local-cluster.env)
  -t, --temp-dir DIR the cluster's temp dir (default: /tmp/fkp-cluster-\$UID-P)
  -p, --base-port P  the --base-port it was started with (default: 26379)
  -g, --grace S      seconds between SIGTERM and SIGKILL (default: 10)
      --clean        also delete the temp dir (logs included)
  -n, --dry-run      list what would be stopped, stop nothing
  -v, --verbose      list the processes stopped
  -h, --help         this text
Exit status: 0 when every process is gone (or none was running), 1 otherwise.
EOF
}

die() { echo "local-down: $*" >&2; exit 1; }

STATE="" TEMP_DIR="" BASE_PORT=26379 GRACE=10 CLEAN=0 DRY=0 VERBOSE=0
while [ $# -gt 0 ]; do
  case "$1" in
    -s|--state) STATE="${2:?$1 needs a value}"; shift 2 ;;
    -t|--temp-dir) TEMP_DIR="${2:?$1 needs a value}"; shift 2 ;;
    -p|--base-port) BASE_PORT="${2:?$1 needs a value}"; shift 2 ;;
    -g|--grace) GRACE="${2:?$1 needs a value}"; shift 2 ;;
    --clean) CLEAN=1; shift ;;
    -n|--dry-run) DRY=1; shift ;;
    -v|--verbose) VERBOSE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[[ "$GRACE" =~ ^[0-9]+$ ]] || die "--grace must be a whole number of seconds"
TEMP_DIR="${TEMP_DIR:-/tmp/fkp-cluster-$(id -u)-$BASE_PORT}"
STATE="${STATE:-$TEMP_DIR/local-cluster.env}"
if [ ! -f "$STATE" ]; then
  echo "local-down: no state file $STATE: nothing to stop"
  exit 0
fi

# Read the state file as data (KEY=VALUE), not as a script.
declare -A S=()
while IFS='=' read -r key value; do
  case "$key" in ''|\#*) continue ;; esac
  S["$key"]="$value"
done <"$STATE"
TEMP_DIR="${S[TEMP_DIR]:?state file lacks TEMP_DIR}"
GCS_PORT="${S[GCS_PORT]:?state file lacks GCS_PORT}"
SIDS="${S[SIDS]:-}"
[[ "$TEMP_DIR" == /*/* ]] || die "refusing a temp dir that is not an absolute path below /: $TEMP_DIR"
[[ "$GCS_PORT" =~ ^[0-9]+$ ]] || die "bad GCS_PORT in $STATE"

ME="$(id -u)"
# Never touch this script's own session (its ps/awk children name the temp dir too) nor its
# ancestors (the shell or test runner that called it). The cluster's processes all run in
# sessions of their own (local-up.sh's setsid, and Ray's for job drivers).
MY_SID="$(ps -o sid= -p $$ | tr -d ' ')"
PROTECT=" "
p=$$
while [ -n "$p" ] && [ "$p" -gt 1 ]; do
  PROTECT+="$p "
  p="$(ps -o ppid= -p "$p" 2>/dev/null | tr -d ' ')"
done

# One line per live process: pid ppid sid args (own processes only: we could not signal others).
snapshot() { ps -eww -o pid=,ppid=,sid=,uid=,stat=,args= | awk -v me="$ME" '$4 == me && $5 !~ /^Z/ { $4 = ""; $5 = ""; print }'; }

# The seeds: Ray programs in our sessions or naming our temp dir, and job drivers of our GCS.
# "Is a Ray program" guards against a recycled session id or a `tail -f` on the logs.
find_targets() {
  local snap extra="" pid
  snap="$(snapshot)"
  # Job drivers (and anything else) bound to our GCS or working inside our temp dir.
  for pid in $(awk '{print $1}' <<<"$snap"); do
    case "$PROTECT" in *" $pid "*) continue ;; esac
    if tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" | grep -Eq "^RAY_ADDRESS=([a-z]+://)?[0-9A-Za-z.:_-]*:$GCS_PORT\$"; then
      extra+="$pid "
    elif [[ "$(readlink 2>/dev/null "/proc/$pid/cwd")" == "$TEMP_DIR"/* ]]; then
      extra+="$pid "
    fi
  done
  awk -v sids=" $SIDS " -v dir="$TEMP_DIR" -v extra=" $extra " -v protect="$PROTECT" -v mysid="$MY_SID" '
    {
      pid = $1; ppid = $2; sid = $3
      args = $0; sub(/^ *[0-9]+ +[0-9]+ +[0-9]+ +/, "", args)
      if (sid == mysid || index(protect, " " pid " ")) next
      parent[pid] = ppid; n++; pids[n] = pid
      # a Ray program: gcs_server, raylet, python .../site-packages/ray/..., python -m ray.*,
      # workers (ray::IDLE, ray::RayTrainWorker...), dashboard modules (ray-dashboard-*)
      rayish = (args ~ /^[^ ]*\/(gcs_server|raylet)( |$)/ || args ~ /site-packages\/ray\// ||
                args ~ /(^| )-m ray\./ || args ~ /^ray(::|-dashboard-)/)
      # in our sessions (a strong sign already) anything Ray-related, the dashboard
      # multiprocessing helpers included; elsewhere only Ray programs that name our temp dir
      insession = index(sids, " " sid " ") && (args ~ /ray/ || args ~ /multiprocessing/)
      if (insession || (rayish && index(args, dir)) || index(extra, " " pid " "))
        hit[pid] = 1
    }
    END {
      # close over descendants (job drivers run in their own sessions under ray::JobSupervisor)
      do {
        grew = 0
        for (i = 1; i <= n; i++) { p = pids[i]; if (!(p in hit) && (parent[p] in hit)) { hit[p] = 1; grew = 1 } }
      } while (grew)
      for (p in hit) print p
    }' <<<"$snap" | sort -n
}

# Running (not a zombie: a process that exited but whose parent, often PID 1, has not reaped it yet).
alive() {
  local p st out=""
  for p in "$@"; do
    st="$(ps -o stat= -p "$p" 2>/dev/null || true)"
    [ -n "$st" ] && [[ "$st" != Z* ]] && out+="$p "
  done
  echo "$out"
}
GCS_LIKE='ray/gcs/gcs_server|autoscaler/_private/monitor\.py'
split_gcs() {  # gcs|rest, pids... -> the given processes that are (not) the GCS / autoscaler monitor
  local want=$1; shift
  local list; list="$(echo "$@" | tr ' ' ',')"
  [ -n "$list" ] || return 0
  if [ "$want" = gcs ]; then
    ps -ww -o pid=,args= -p "$list" | grep -E "$GCS_LIKE" | awk '{printf "%s ", $1}' || true
  else
    ps -ww -o pid=,args= -p "$list" | grep -Ev "$GCS_LIKE" | awk '{printf "%s ", $1}' || true
  fi
}
show() { local list; list="$(echo $* | tr ' ' ',')"; [ -z "$list" ] || ps -ww -o pid=,sid=,args= -p "$list" | cut -c1-160; }

targets="$(find_targets | tr '\n' ' ')"
if [ "$DRY" = 1 ]; then
  # shellcheck disable=SC2086
  show $targets
  echo "local-down: would stop $(wc -w <<<"$targets") process(es) of the cluster in $TEMP_DIR"
  exit 0
fi

terminate() {  # grace, pids...: SIGTERM, wait up to grace seconds, SIGKILL what is left
  local grace=$1; shift
  [ $# -gt 0 ] || return 0
  [ "$VERBOSE" = 0 ] || show "$@" | sed 's/^/  TERM /'
  kill -TERM "$@" 2>/dev/null || true
  local deadline=$((SECONDS + grace)) left
  while left="$(alive "$@")"; [ -n "$left" ] && [ $SECONDS -lt $deadline ]; do sleep 0.3; done
  [ -n "$left" ] || return 0
  # shellcheck disable=SC2086
  [ "$VERBOSE" = 0 ] || show $left | sed 's/^/  KILL /'
  # shellcheck disable=SC2086
  kill -KILL $left 2>/dev/null || true
  deadline=$((SECONDS + 5))
  # shellcheck disable=SC2086
  while [ -n "$(alive $left)" ] && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
}

# The GCS goes last: with it alive, raylets, agents and workers unregister and exit within a
# second or so of SIGTERM; with it gone they hang for many seconds. The Ray 2.60 gcs_server and
# autoscaler monitor themselves do not exit on SIGTERM (seen: >20 s), so they get a short grace.
stopped=0
for round in 1 2 3; do   # rescan: a dying raylet may still have forked a worker
  [ -n "${targets// /}" ] || break
  stopped=$((stopped + $(wc -w <<<"$targets")))
  # shellcheck disable=SC2086
  terminate "$GRACE" $(split_gcs rest $targets)
  # shellcheck disable=SC2086
  terminate 2 $(split_gcs gcs $targets)
  targets="$(find_targets | tr '\n' ' ')"
done

if [ -n "${targets// /}" ]; then
  echo "local-down: still running after SIGKILL: $targets" >&2
  exit 1
fi
mv -f "$STATE" "$STATE.stopped"
if [ "$CLEAN" = 1 ]; then
  rm -rf -- "$TEMP_DIR"
fi
echo "local-down: stopped $stopped process(es) of the cluster in $TEMP_DIR"
