#!/usr/bin/env bash
# Start the Ray head of a dist-quant cluster on this node (see --help).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<EOF
Usage: launch/start_head.sh [options]

Start the Ray head on this node, with this node's NPUs as the "NPU" resource, and wait until it answers.
Run it once on the first node; then launch/start_worker.sh --head ADDRESS on every other node.

Options (flags win over the environment):
  --port PORT            GCS port (env DIST_QUANT_PORT, default 6379)
  --node-ip IP           address of this node that the other nodes reach (env DIST_QUANT_NODE_IP,
                         default: first non-loopback IPv4 of 'hostname -I')
  --npus N               NPUs this node offers (env DIST_QUANT_NPUS; default: count of /dev/davinci<N>,
                         else 'npu-smi info -l', else 0; 0 is allowed: a CPU-only head)
  --num-cpus C           CPUs Ray may schedule on this node (default: all)
  --dashboard-host HOST  interface of the dashboard (env DIST_QUANT_DASHBOARD_HOST, default 127.0.0.1;
                         0.0.0.0 exposes it to the network)
  --dashboard-port PORT  dashboard port (env DIST_QUANT_DASHBOARD_PORT, default 8265)
  --no-dashboard         do not start the dashboard
  --temp-dir DIR         Ray's temp/session folder (default: Ray's, \$RAY_TMPDIR/ray or /tmp/ray)
  --timeout SECONDS      how long to wait for the head to answer (env DIST_QUANT_TIMEOUT, default 60)
  --block                stay in the foreground while Ray runs (for srun/containers; Ctrl-C stops Ray)
  -h, --help             this help

Environment: ASCEND_ENV (CANN set_env.sh, sourced when present; default
/usr/local/Ascend/ascend-toolkit/set_env.sh), RAY_AUTH_MODE (see launch/common.sh).
Running it again while the head runs on that port is harmless: it says so and exits 0.

Example:
  launch/start_head.sh --port 6379 --npus 8
EOF
}

port=${DIST_QUANT_PORT:-6379}
node_ip=${DIST_QUANT_NODE_IP:-}
npus_flag=""
num_cpus=""
dashboard_host=${DIST_QUANT_DASHBOARD_HOST:-127.0.0.1}
dashboard_port=${DIST_QUANT_DASHBOARD_PORT:-8265}
dashboard=1
temp_dir=""
wait_s=${DIST_QUANT_TIMEOUT:-60}
block=0

while (($#)); do
    case $1 in
        --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
        -h | --help) usage; exit 0 ;;
        --port) port=$(dq_need_value "$@"); shift ;;
        --node-ip | --node-ip-address) node_ip=$(dq_need_value "$@"); shift ;;
        --npus) npus_flag=$(dq_need_value "$@"); shift ;;
        --num-cpus) num_cpus=$(dq_need_value "$@"); shift ;;
        --dashboard-host) dashboard_host=$(dq_need_value "$@"); shift ;;
        --dashboard-port) dashboard_port=$(dq_need_value "$@"); shift ;;
        --no-dashboard) dashboard=0 ;;
        --temp-dir) temp_dir=$(dq_need_value "$@"); shift ;;
        --timeout) wait_s=$(dq_need_value "$@"); shift ;;
        --block) block=1 ;;
        *) dq_die "unknown option '$1' (see --help)" ;;
    esac
    shift
done

dq_check_uint --port "$port"
dq_check_uint --dashboard-port "$dashboard_port"
dq_check_uint --timeout "$wait_s"
[[ -z $num_cpus ]] || dq_check_uint --num-cpus "$num_cpus"
node_ip=${node_ip:-$(dq_default_ip)}
temp_dir=$(dq_abs_dir "$temp_dir")
dq_prepare_node

# A head's GCS address is one of this node's addresses (Ray replaces a loopback --node-ip by the node's own).
hosts="$(dq_resolve "$node_ip" | tr '\n' ' ') $(dq_local_ips | tr '\n' ' ')"

existing=$(dq_find_raylet "$port" "$hosts" "$temp_dir")
if [[ -n $existing ]]; then
    read -r raylet_pid node_id gcs_address <<<"$existing"
    if status=$(dq_ray_status "$gcs_address") && [[ $status == *"Node status"* ]]; then
        dq_info "a Ray head is already running on this node at $gcs_address (node $node_id); nothing to do"
        dq_info "workers join with: launch/start_worker.sh --head $gcs_address"
        if ((block)); then dq_block "$raylet_pid" "$temp_dir"; fi
        exit 0
    fi
    dq_die "a raylet (pid $raylet_pid) is attached to $gcs_address but the cluster does not answer;" \
           "stop it with launch/stop.sh and start again"
fi

if [[ -n $temp_dir ]] && other=$(dq_find_raylet "$port" "$hosts" "") && [[ -n $other ]]; then
    dq_die "a Ray head with another temp dir already runs on this node at $(awk '{print $3}' <<<"$other");" \
           "use it, stop it (launch/stop.sh), or choose another --port"
fi
ports=("--port=$port")
((dashboard)) && ports+=("--dashboard-port=$dashboard_port")
for item in "${ports[@]}"; do
    p=${item#*=}
    if dq_tcp_open 127.0.0.1 "$p" 2 || dq_tcp_open "$node_ip" "$p" 2; then
        owner=$(dq_port_owner "$p")
        dq_die "port $p (${item%%=*}) is already in use${owner:+ by $owner}, not by a Ray head of this user on" \
               "this node; choose another one with ${item%%=*}, or stop what uses it"
    fi
done

read -r npus npu_source <<<"$(dq_npu_count "$npus_flag")"
dq_info "node $node_ip: $npus NPU(s) ($npu_source)${num_cpus:+, $num_cpus CPU(s)}"

args=(--head --port "$port" --node-ip-address "$node_ip" --resources "{\"NPU\": $npus}" --disable-usage-stats)
[[ -z $num_cpus ]] || args+=(--num-cpus "$num_cpus")
if ((dashboard)); then
    args+=(--include-dashboard true --dashboard-host "$dashboard_host" --dashboard-port "$dashboard_port")
else
    args+=(--include-dashboard false)
fi
[[ -z $temp_dir ]] || args+=(--temp-dir "$temp_dir")

log=$(mktemp "${TMPDIR:-/tmp}/dist_quant_start_head.XXXXXX.log")
dq_ray_start "$log" "${args[@]}"

started=$(dq_find_raylet "$port" "$hosts" "$temp_dir")
[[ -n $started ]] || started=$(dq_find_raylet "$port" "" "$temp_dir")
gcs_address=$(awk '{print $3}' <<<"$started")
gcs_address=${gcs_address:-$node_ip:$port}
dq_info "waiting up to ${wait_s}s for the head at $gcs_address to answer"
if ! dq_wait_cluster "$gcs_address" "$wait_s" 1; then
    printf '%s\n' "$DQ_LAST_STATUS" | tail -n 15 >&2
    dq_auth_hint "$DQ_LAST_STATUS"
    dq_die "the head did not answer within ${wait_s}s (ray start output: $log; Ray logs:" \
           "$(dq_ray_dir "$temp_dir")/session_latest/logs)"
fi

status=$DQ_LAST_STATUS
dq_info "Ray head is up: $(dq_cluster_total "$status" CPU) CPU, $(dq_cluster_total "$status" NPU) NPU" \
        "(ray start output: $log)"
dq_info "cluster address: $gcs_address"
dq_info "  workers:    launch/start_worker.sh --head $gcs_address"
dq_info "  quantize:   launch/quant_cluster.sh --address $gcs_address --model_path ... --save_path ..."
dq_info "  status:     ray status --address $gcs_address"
if ((dashboard)); then
    if [[ $dashboard_host == 127.0.0.1 || $dashboard_host == localhost ]]; then
        dq_info "  dashboard:  http://127.0.0.1:$dashboard_port on this node;" \
                "from elsewhere: ssh -L $dashboard_port:127.0.0.1:$dashboard_port $(hostname)"
    else
        dq_info "  dashboard:  http://$node_ip:$dashboard_port"
    fi
fi
dq_info "  stop:       launch/stop.sh${temp_dir:+ --temp-dir $temp_dir} (on every node)"
dq_auth_note
if ((block)); then
    dq_block "$(awk '{print $1}' <<<"$started")" "$temp_dir"
fi
