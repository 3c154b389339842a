#!/usr/bin/env bash
# Stop Ray on this node and check that none of its processes remain (see --help).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<EOF
Usage: launch/stop.sh [--force] [--temp-dir DIR] [--grace SECONDS] [--timeout SECONDS]

Stop Ray on this node (run it on every node of the cluster), then check that no Ray process of this user
remains (raylet, gcs_server, dashboard, log monitor, workers ray::...) and report.

Options:
  --force            kill at once (SIGKILL) instead of asking processes to exit
  --temp-dir DIR     stop only the Ray started with this --temp-dir (start_head.sh/start_worker.sh
                     --temp-dir), leaving other Ray instances of this user alone; without it: 'ray stop',
                     which stops every Ray instance of this user on this node
  --grace SECONDS    how long processes get to exit after SIGTERM before SIGKILL (default 16, like ray stop)
  --timeout SECONDS  how long to wait, after that, for every process to be gone (default 10)
  -h, --help         this help

Exit status: 0 when no (matching) Ray process remains, 1 otherwise (the survivors are listed).
EOF
}

force=0
temp_dir=""
grace=16
wait_s=10
while (($#)); do
    case $1 in
        --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
        -h | --help) usage; exit 0 ;;
        -f | --force) force=1 ;;
        --temp-dir) temp_dir=$(dq_need_value "$@"); shift ;;
        --grace) grace=$(dq_need_value "$@"); shift ;;
        --timeout) wait_s=$(dq_need_value "$@"); shift ;;
        *) dq_die "unknown option '$1' (see --help)" ;;
    esac
    shift
done
dq_check_uint --timeout "$wait_s"
dq_check_uint --grace "$grace"

# The processes of the Ray instance that uses TEMP_DIR: those naming it, the head's client server (it names
# only the GCS address) and every descendant (workers, agents, dashboard modules).
scoped_pids() {
    local table roots gcs
    table=$(ps -ww -u "$(id -u)" -o pid=,ppid=,args= 2>/dev/null)
    roots=$(dq_ray_processes "$temp_dir" | awk '{print $1}')
    gcs=$(dq_ray_processes "$temp_dir" | awk '/gcs\/gcs_server/ {
        for (i = 3; i <= NF; i++) if ($i ~ /^--gcs_server_port=/) print substr($i, 19) }' | head -1)
    if [[ -n $gcs ]]; then
        roots+=$'\n'$(awk -v port="$gcs" '/ray\.util\.client\.server/ && $0 ~ ("--address=[^ ]*:" port "( |$)") {
            print $1 }' <<<"$table")
    fi
    awk -v roots="$roots" -v self="$$" '
        BEGIN { n = split(roots, r, "\n"); for (i = 1; i <= n; i++) if (r[i] != "") keep[r[i]] = 1 }
        { parent[$1] = $2; pids[++count] = $1 }
        END {
            do {
                changed = 0
                for (i = 1; i <= count; i++) {
                    p = pids[i]
                    if (!(p in keep) && (parent[p] in keep) && p != self) { keep[p] = 1; changed = 1 }
                }
            } while (changed)
            for (p in keep) print p
        }' <<<"$table" | sort -n
}

alive() {  # alive PIDS...: those still running
    local pid
    for pid in "$@"; do
        if kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
    done
}

report_survivors() {
    local pids=("$@")
    dq_warn "${#pids[@]} Ray process(es) still running:"
    ps -ww -o pid=,args= -p "$(IFS=,; echo "${pids[*]}")" 2>/dev/null | cut -c1-160 >&2 || true
    dq_die "Ray did not stop completely; run launch/stop.sh --force${temp_dir:+ --temp-dir $temp_dir}"
}

# bucket PIDS...: "1" raylets, "3" GCS servers, "2" the rest (ray stop's order: raylet, others, GCS last).
bucket_of() {
    ps -ww -o pid=,args= -p "$1" 2>/dev/null | awk '
        /raylet\/raylet/ { print 1; exit } /gcs\/gcs_server/ { print 3; exit } NF { print 2 }'
}

# stop_scoped: SIGTERM each bucket in turn, SIGKILL what outlives grace/3; --force: SIGKILL everything.
stop_scoped() {
    local pids=("$@") b pid per_bucket deadline group names
    if ((force)); then
        kill -KILL "${pids[@]}" 2>/dev/null || true
        return
    fi
    per_bucket=$(((grace + 2) / 3))
    for b in 1 2 3; do
        group=()
        for pid in $(alive "${pids[@]}"); do
            [[ $(bucket_of "$pid") == "$b" ]] && group+=("$pid")
        done
        ((${#group[@]})) || continue
        kill -TERM "${group[@]}" 2>/dev/null || true
        deadline=$((SECONDS + per_bucket))
        while [[ -n $(alive "${group[@]}") ]] && ((SECONDS < deadline)); do sleep 0.5; done
        mapfile -t group < <(alive "${group[@]}")
        if ((${#group[@]})); then
            names=("" raylet "${#group[@]} process(es)" gcs_server)
            dq_info "  ${names[b]} did not exit within ${per_bucket}s: SIGKILL"
            kill -KILL "${group[@]}" 2>/dev/null || true
        fi
    done
}

if [[ -n $temp_dir ]]; then
    [[ -d $temp_dir ]] && temp_dir=$(cd "$temp_dir" && pwd -P)
    mapfile -t pids < <(scoped_pids)
    if ((${#pids[@]} == 0)); then
        dq_info "no Ray process uses $temp_dir; nothing to stop"
        exit 0
    fi
    how=$( ((force)) && echo "SIGKILL" || echo "SIGTERM, SIGKILL after ${grace}s")
    dq_info "stopping the Ray instance in $temp_dir: ${#pids[@]} process(es) ($how)"
    stop_scoped "${pids[@]}"
    deadline=$((SECONDS + wait_s))
    while :; do
        # Late children (a worker starting while its raylet exits) are caught here too.
        mapfile -t left < <({ alive "${pids[@]}"; scoped_pids; } | awk 'NF && !seen[$0]++')
        ((${#left[@]} == 0)) && break
        if ((SECONDS >= deadline)); then report_survivors "${left[@]}"; fi
        kill -KILL "${left[@]}" 2>/dev/null || true
        sleep 0.5
    done
    dq_info "stopped: no Ray process uses $temp_dir any more"
    exit 0
fi

dq_require_ray
args=(stop --grace-period "$grace")
((force)) && args+=(--force)
dq_info "ray ${args[*]}"
ray "${args[@]}" || dq_warn "ray ${args[*]} returned an error; checking what is left"
deadline=$((SECONDS + wait_s))
while :; do
    mapfile -t left < <(dq_ray_processes | awk '{print $1}')
    ((${#left[@]} == 0)) && break
    if ((SECONDS >= deadline)); then report_survivors "${left[@]}"; fi
    sleep 0.5
done
dq_info "stopped: no Ray process of user $(id -un) is left on this node"
