#!/usr/bin/env bash
# Quantize a model on a running dist-quant Ray cluster (see --help).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<EOF
Usage: launch/quant_cluster.sh --model_path P --save_path S [options] [-- extra dist-quant options]

Run 'dist-quant quant' against the running Ray cluster (launch/start_head.sh, launch/start_worker.sh), one
actor per card, with its output on the terminal and in a log file.

Options:
  --model_path P      float Hugging Face model directory (on a path every node can read)
  --save_path S       output directory (on a path every node can write)
  --address A         the cluster: 'auto' (the one on this node) or HOST:PORT (env DIST_QUANT_ADDRESS,
                      default auto)
  --workers N         actors, one per card (default: the cluster's NPUs; GPUs for --device cuda;
                      CPUs for --device cpu)
  --device D          npu (default), cuda or cpu
  --config_path R     recipe YAML (default: the bundled W8A8 recipe, dist_quant/configs/qwen3_vl_moe_w8a8.yaml)
  --model_type T      Qwen3-VL-235B-A22B (default) or Qwen3-VL-30B-A3B
  --dataset D         calibration set (index.json[l] or image folder; default: the recipe's)
  --overwrite         replace the content of a non-empty save_path
  --quiet             no progress bar
  --log FILE          log file, appended to (default: S.log, next to S)
  -h, --help          this help
Everything after '--' goes to dist-quant as it is (e.g. -- --trust_remote_code True --expert_group_size 8).

Example:
  launch/quant_cluster.sh --address 10.0.0.1:6379 --model_path /models/Qwen3-VL-235B-A22B-Instruct \\
      --save_path /models/Qwen3-VL-235B-A22B-w8a8 --dataset /data/calib/index.jsonl
EOF
}

model_path=""
save_path=""
address=${DIST_QUANT_ADDRESS:-auto}
workers=""
device=npu
config_path=""
model_type=Qwen3-VL-235B-A22B
dataset=""
log=""
flags=()
extra=()

while (($#)); do
    case $1 in
        --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
        -h | --help) usage; exit 0 ;;
        --model_path | --model-path) model_path=$(dq_need_value "$@"); shift ;;
        --save_path | --save-path) save_path=$(dq_need_value "$@"); shift ;;
        --address | --ray_address) address=$(dq_need_value "$@"); shift ;;
        --workers) workers=$(dq_need_value "$@"); shift ;;
        --device) device=$(dq_need_value "$@"); shift ;;
        --config_path | --config-path) config_path=$(dq_need_value "$@"); shift ;;
        --model_type | --model-type) model_type=$(dq_need_value "$@"); shift ;;
        --dataset) dataset=$(dq_need_value "$@"); shift ;;
        --overwrite | --quiet) flags+=("$1") ;;
        --log) log=$(dq_need_value "$@"); shift ;;
        --) shift; extra=("$@"); break ;;
        *) dq_die "unknown option '$1' (see --help; dist-quant options go after --)" ;;
    esac
    shift
done

[[ -n $model_path ]] || dq_die "--model_path is required"
[[ -n $save_path ]] || dq_die "--save_path is required"
[[ -d $model_path ]] || dq_die "--model_path $model_path is not a directory"
[[ -z $config_path || -f $config_path ]] || dq_die "--config_path $config_path does not exist"
case $device in
    npu) resource=NPU ;;
    cuda) resource=GPU ;;
    cpu) resource=CPU ;;
    *) dq_die "--device must be npu, cuda or cpu, got '$device'" ;;
esac
[[ -z $workers ]] || dq_check_uint --workers "$workers"

dq_require_ray
command -v dist-quant >/dev/null 2>&1 \
    || dq_die "the 'dist-quant' command was not found: activate the project's virtual environment" \
              "(. .venv/bin/activate) or install the project (pip install -e .)"
[[ $device != npu ]] || dq_source_cann
dq_setup_auth

if [[ $address == *:* ]] && ! dq_tcp_open "${address%:*}" "${address##*:}" 5; then
    dq_die "no Ray head answers at $address (TCP connection refused or not answered within 5 s). Start it with" \
           "launch/start_head.sh (and launch/start_worker.sh on the other nodes), or pass the --address it printed"
fi
if ! status=$(dq_ray_status "$address") || [[ $status != *"Node status"* ]]; then
    printf '%s\n' "$status" | tail -n 5 >&2
    dq_auth_hint "$status"
    dq_die "no Ray cluster answers at '$address'. Start one with launch/start_head.sh (and launch/start_worker.sh" \
           "on the other nodes), or pass --address HOST:PORT as start_head.sh printed it"
fi
total=$(dq_cluster_total "$status" "$resource")
nodes=$(dq_cluster_nodes "$status")
if [[ -z $workers ]]; then
    ((total > 0)) || dq_die "the cluster at '$address' has no $resource for --device $device" \
                            "(start the nodes with --npus N, or choose --device)"
    workers=$total
fi
((workers > 0)) || dq_die "--workers must be at least 1"
((workers <= total)) || dq_warn "--workers $workers is more than the cluster's $total $resource; dist-quant will refuse"

log=${log:-${save_path%/}.log}
mkdir -p "$(dirname "$log")"

cmd=(dist-quant quant --model_path "$model_path" --save_path "$save_path" --device "$device"
     --model_type "$model_type" --quant_type w8a8 --ray_address "$address" --workers "$workers")
[[ -z $config_path ]] || cmd+=(--config_path "$config_path")
[[ -z $dataset ]] || cmd+=(--dataset "$dataset")
cmd+=("${flags[@]}" "${extra[@]}")

{
    echo "# $(date '+%Y-%m-%d %H:%M:%S') on $(hostname): cluster '$address', $nodes node(s), $total $resource"
    echo "# recipe: ${config_path:-bundled default (dist_quant/configs/qwen3_vl_moe_w8a8.yaml)}"
    echo "# $(printf '%q ' "${cmd[@]}")"
} | tee -a "$log"

set +e
PYTHONUNBUFFERED=1 "${cmd[@]}" 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
set -e

if ((rc != 0)); then
    printf '[%s] error: dist-quant failed (exit status %s); the whole output is in %s\n' "$DQ_NAME" "$rc" "$log" >&2
    exit "$rc"
fi
if [[ ! -f $save_path/quant_model_description.json ]]; then
    dq_die "dist-quant exited 0 but $save_path has no quant_model_description.json; see $log"
fi
parts=$(find "$save_path" -maxdepth 1 -name '*.safetensors' | wc -l)
size=$(du -sh "$save_path" 2>/dev/null | cut -f1)
dq_info "done: checkpoint in $save_path ($parts safetensors file(s), $size)"
dq_info "log: $log"
