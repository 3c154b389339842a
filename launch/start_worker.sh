#!/usr/bin/env bash
# Join this node to a dist-quant Ray cluster (see --help).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<EOF
Usage: launch/start_worker.sh --head HOST:PORT [options]

Join this node to the Ray cluster whose head runs at HOST:PORT (printed by launch/start_head.sh), offering
this node's NPUs as the "NPU" resource, and wait until the cluster lists this node.

Options (flags win over the environment):
  --head HOST:PORT   the head's address (env DIST_QUANT_HEAD)
  --npus N           NPUs this node offers (env DIST_QUANT_NPUS; default: count of /dev/davinci<N>,
                     else 'npu-smi info -l', else 0)
  --node-ip IP       address of this node that the others reach (env DIST_QUANT_NODE_IP; default: the one
                     Ray picks, the interface that reaches the head)
  --num-cpus C       CPUs Ray may schedule on this node (default: all)
  --temp-dir DIR     Ray's temp/session folder on this node (default: Ray's, \$RAY_TMPDIR/ray or /tmp/ray)
  --timeout SECONDS  how long to wait for the head's port and for this node to appear
                     (env DIST_QUANT_TIMEOUT, default 60; the TCP check itself gives up after 5 s)
  --wait-for-head    retry the head's port until --timeout instead of failing at once
  --block            stay in the foreground while Ray runs (for srun/containers; Ctrl-C stops Ray)
  -h, --help         this help

Environment: ASCEND_ENV (CANN set_env.sh, sourced when present; default
/usr/local/Ascend/ascend-toolkit/set_env.sh), RAY_AUTH_MODE (see launch/common.sh).
Running it again once this node has joined is harmless: it says so and exits 0.

Example:
  launch/start_worker.sh --head 10.0.0.1:6379 --npus 8
EOF
}

head_address=${DIST_QUANT_HEAD:-}
npus_flag=""
node_ip=${DIST_QUANT_NODE_IP:-}
num_cpus=""
temp_dir=""
wait_s=${DIST_QUANT_TIMEOUT:-60}
block=0
wait_head=0

while (($#)); do
    case $1 in
        --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
        -h | --help) usage; exit 0 ;;
        --head | --address) head_address=$(dq_need_value "$@"); shift ;;
        --npus) npus_flag=$(dq_need_value "$@"); shift ;;
        --node-ip | --node-ip-address) node_ip=$(dq_need_value "$@"); shift ;;
        --num-cpus) num_cpus=$(dq_need_value "$@"); shift ;;
        --temp-dir) temp_dir=$(dq_need_value "$@"); shift ;;
        --timeout) wait_s=$(dq_need_value "$@"); shift ;;
        --block) block=1 ;;
        --wait-for-head) wait_head=1 ;;
        *) dq_die "unknown option '$1' (see --help)" ;;
    esac
    shift
done

[[ -n $head_address ]] || dq_die "--head HOST:PORT is required (the address launch/start_head.sh printed)"
[[ $head_address == *:* ]] || dq_die "--head must be HOST:PORT, got '$head_address'"
head_host=${head_address%:*}
head_port=${head_address##*:}
dq_check_uint "the port of --head" "$head_port"
dq_check_uint --timeout "$wait_s"
[[ -z $num_cpus ]] || dq_check_uint --num-cpus "$num_cpus"
temp_dir=$(dq_abs_dir "$temp_dir")
dq_prepare_node

# Ray records the head by IP (a loopback head address becomes the head's own address).
hosts="$(dq_resolve "$head_host" | tr '\n' ' ')"
if [[ $head_host == 127.* || $head_host == localhost ]]; then
    hosts="$hosts $(dq_local_ips | tr '\n' ' ')"
fi

existing=$(dq_find_raylet "$head_port" "$hosts" "$temp_dir")
if [[ -n $existing ]]; then
    read -r raylet_pid node_id gcs_address <<<"$existing"
    if dq_wait_cluster "$gcs_address" 0 1 "$node_id"; then
        dq_info "this node already belongs to the cluster at $gcs_address (node $node_id); nothing to do"
        if ((block)); then dq_block "$raylet_pid" "$temp_dir"; fi
        exit 0
    fi
    dq_die "a raylet (pid $raylet_pid) is attached to $gcs_address but the cluster does not list it;" \
           "run launch/stop.sh${temp_dir:+ --temp-dir $temp_dir} on this node and try again"
fi

# Fail fast and clearly when the head cannot be reached (ray start would retry for a long time).
deadline=$((SECONDS + wait_s))
until dq_tcp_open "$head_host" "$head_port" 5; do
    if ((!wait_head || SECONDS + 5 >= deadline)); then
        dq_die "cannot reach the Ray head at $head_address (TCP connection refused or not answered$( ((wait_head)) && echo " for ${wait_s}s" || echo " within 5 s")). Check that" \
               "launch/start_head.sh runs on that node and printed this address, that '$head_host' resolves" \
               "from here, and that no firewall blocks port $head_port (Ray's nodes also need to reach each" \
               "other on the raylet, object manager and worker ports)"
    fi
    sleep 2
done

read -r npus npu_source <<<"$(dq_npu_count "$npus_flag")"
dq_info "joining $head_address with $npus NPU(s) ($npu_source)${num_cpus:+, $num_cpus CPU(s)}"

args=(--address "$head_address" --resources "{\"NPU\": $npus}" --disable-usage-stats)
[[ -z $node_ip ]] || args+=(--node-ip-address "$node_ip")
[[ -z $num_cpus ]] || args+=(--num-cpus "$num_cpus")
[[ -z $temp_dir ]] || args+=(--temp-dir "$temp_dir")

log=$(mktemp "${TMPDIR:-/tmp}/dist_quant_start_worker.XXXXXX.log")
dq_ray_start "$log" "${args[@]}"

started=$(dq_find_raylet "$head_port" "$hosts" "$temp_dir")
[[ -n $started ]] || started=$(dq_find_raylet "$head_port" "" "$temp_dir")
[[ -n $started ]] || dq_die "ray start succeeded but no raylet of this user is attached to port $head_port (output: $log)"
read -r raylet_pid node_id gcs_address <<<"$started"
dq_info "waiting up to $((deadline - SECONDS > 5 ? deadline - SECONDS : 5))s for the cluster to list this node ($node_id)"
if ! dq_wait_cluster "$gcs_address" "$((deadline - SECONDS > 5 ? deadline - SECONDS : 5))" 1 "$node_id"; then
    printf '%s\n' "$DQ_LAST_STATUS" | tail -n 15 >&2
    dq_auth_hint "$DQ_LAST_STATUS"
    dq_die "the cluster at $gcs_address does not list this node (ray start output: $log; Ray logs:" \
           "$(dq_ray_dir "$temp_dir")/session_latest/logs/raylet.out)"
fi
status=$DQ_LAST_STATUS
dq_info "joined $gcs_address: the cluster now has $(dq_cluster_nodes "$status") node(s)," \
        "$(dq_cluster_total "$status" CPU) CPU, $(dq_cluster_total "$status" NPU) NPU (ray start output: $log)"
dq_info "stop this node with: launch/stop.sh${temp_dir:+ --temp-dir $temp_dir}"
if ((block)); then dq_block "$raylet_pid" "$temp_dir"; fi
