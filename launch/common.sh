# shellcheck shell=bash
# Helpers shared by the launch/ scripts (sourced, not run). Every function is prefixed dq_.
#
# Environment read here:
#   DIST_QUANT_NPUS   NPU count of this node (overrides detection; 0 allowed)
#   ASCEND_ENV        CANN environment script (default /usr/local/Ascend/ascend-toolkit/set_env.sh)
#   RAY_AUTH_MODE     Ray's token authentication; when unset and a token exists (RAY_AUTH_TOKEN,
#                     RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) it is set to "token" for every ray command
#                     and dist-quant, the same choice `ray start --head` makes on its own.

DQ_NAME=$(basename "${BASH_SOURCE[1]:-$0}")
DQ_LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DQ_DEFAULT_ASCEND_ENV=/usr/local/Ascend/ascend-toolkit/set_env.sh

dq_info() { printf '[%s] %s\n' "$DQ_NAME" "$*"; }
dq_warn() { printf '[%s] warning: %s\n' "$DQ_NAME" "$*" >&2; }
dq_die() { printf '[%s] error: %s\n' "$DQ_NAME" "$*" >&2; exit 1; }

# dq_need_value OPTION "$@": the value that follows OPTION, or a usage error.
dq_need_value() {
    if [[ $# -lt 2 || -z $2 || $2 == --* ]]; then
        dq_die "$1 needs a value (see --help)"
    fi
    printf '%s' "$2"
}

dq_is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

dq_check_uint() {  # dq_check_uint NAME VALUE
    dq_is_uint "$2" || dq_die "$1 must be a whole number, got '$2'"
}

dq_require_ray() {
    if ! command -v ray >/dev/null 2>&1; then
        dq_die "the 'ray' command was not found. Activate the project's virtual environment" \
               "(. .venv/bin/activate, created by bash scripts/setup.sh) or install Ray: pip install 'ray[default]'"
    fi
}

# Source the CANN environment when it exists (ASCEND_ENV overrides the path). CANN's script reads unset
# variables, so nounset is off while it runs.
dq_source_cann() {
    local env_file=${ASCEND_ENV:-$DQ_DEFAULT_ASCEND_ENV}
    if [[ -f $env_file ]]; then
        set +u
        # shellcheck disable=SC1090
        source "$env_file" || dq_warn "sourcing $env_file returned an error; continuing"
        set -u
        dq_info "CANN environment: $env_file"
    elif [[ -n ${ASCEND_ENV:-} ]]; then
        dq_warn "ASCEND_ENV=$ASCEND_ENV does not exist; CANN environment not loaded"
    fi
}

# NPUs of this node: /dev/davinci<N> devices, else `npu-smi info -l`, else 0.
dq_detect_npus() {
    local devices=() dev count
    for dev in /dev/davinci[0-9]*; do
        [[ -e $dev && ${dev#/dev/davinci} =~ ^[0-9]+$ ]] && devices+=("$dev")
    done
    if ((${#devices[@]} > 0)); then
        echo "${#devices[@]}"
        return
    fi
    if command -v npu-smi >/dev/null 2>&1; then
        count=$(npu-smi info -l 2>/dev/null | awk -F: '/Total Count/ {gsub(/ /, "", $2); print $2; exit}') || true
        if [[ -z $count ]]; then
            count=$(npu-smi info -l 2>/dev/null | grep -c 'NPU ID') || true
        fi
        if dq_is_uint "${count:-}"; then
            echo "$count"
            return
        fi
    fi
    echo 0
}

# dq_npu_count FLAG_VALUE: the flag, else DIST_QUANT_NPUS, else detection. Prints "COUNT SOURCE".
dq_npu_count() {
    local flag=$1
    if [[ -n $flag ]]; then
        dq_check_uint --npus "$flag"
        echo "$flag --npus"
    elif [[ -n ${DIST_QUANT_NPUS:-} ]]; then
        dq_check_uint DIST_QUANT_NPUS "$DIST_QUANT_NPUS"
        echo "$DIST_QUANT_NPUS DIST_QUANT_NPUS"
    else
        echo "$(dq_detect_npus) detected"
    fi
}

# First non-loopback IPv4 address of this node (hostname -I), else 127.0.0.1.
dq_default_ip() {
    local ip
    for ip in $(hostname -I 2>/dev/null || true); do
        if [[ $ip =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ && $ip != 127.* ]]; then
            echo "$ip"
            return
        fi
    done
    echo 127.0.0.1
}

# IPv4 addresses of this node, one per line (loopback included).
dq_local_ips() {
    echo 127.0.0.1
    local ip
    for ip in $(hostname -I 2>/dev/null || true); do
        echo "$ip"
    done
}

# dq_resolve HOST: its IPv4 addresses (the host itself when it is one or cannot be resolved).
dq_resolve() {
    if [[ $1 =~ ^[0-9.]+$ ]]; then
        echo "$1"
    elif command -v getent >/dev/null 2>&1 && getent ahostsv4 "$1" >/dev/null 2>&1; then
        getent ahostsv4 "$1" | awk '{print $1}' | sort -u
    else
        echo "$1"
    fi
}

# dq_tcp_open HOST PORT [SECONDS]: true when something accepts TCP connections there.
dq_tcp_open() {
    # shellcheck disable=SC2016  # $1 and $2 belong to the inner bash
    timeout "${3:-5}" bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" >/dev/null 2>&1
}

# Who listens on PORT (best effort, for error messages).
dq_port_owner() {
    if command -v ss >/dev/null 2>&1; then
        ss -Hltnp "sport = :$1" 2>/dev/null | sed -n 's/.*users:((\(.*\)))/\1/p' | head -1
    fi
}

dq_setup_auth() {
    if [[ -n ${RAY_AUTH_MODE:-} ]]; then
        return
    fi
    if [[ -n ${RAY_AUTH_TOKEN:-} || (-n ${RAY_AUTH_TOKEN_PATH:-} && -s ${RAY_AUTH_TOKEN_PATH:-}) \
          || -s ${HOME:-/nonexistent}/.ray/auth_token ]]; then
        export RAY_AUTH_MODE=token
    fi
}

# Ray processes of this user: "PID PPID ARGS" lines, optionally only those whose command line names the folder DIR.
dq_ray_processes() {  # dq_ray_processes [DIR]
    local text=${1:-}
    ps -ww -u "$(id -u)" -o pid=,ppid=,args= 2>/dev/null | awk -v text="$text" -v self="$$" '
        $1 == self { next }
        /ray\/core\/src\/ray\/(raylet\/raylet|gcs\/gcs_server)|ray\/dashboard\/(dashboard|agent)\.py|ray\/_private\/log_monitor\.py|ray\/autoscaler\/_private\/monitor\.py|ray\.util\.client\.server|ray\/_private\/workers\/default_worker\.py|ray\/_private\/runtime_env\/agent\/main\.py|^ *[0-9]+ +[0-9]+ +(ray::|ray-dashboard-)/ {
            if (text == "" || index($0, text "/") > 0 || index($0 " ", text " ") > 0) print
        }'
}

# dq_find_raylet PORT HOSTS TEMP_DIR: "PID NODE_ID GCS_ADDRESS" of this user's raylet connected to a GCS on PORT
# at one of HOSTS (space-separated IPs; empty: any), started with TEMP_DIR when given. Empty when none.
dq_find_raylet() {
    local port=$1 hosts=$2 temp_dir=$3
    ps -ww -u "$(id -u)" -o pid=,args= 2>/dev/null | awk -v port="$port" -v hosts=" $hosts " -v tdir="$temp_dir" '
        $2 ~ /\/raylet\/raylet$/ {
            gcs = ""; node = ""; td = ""
            for (i = 3; i <= NF; i++) {
                if ($i ~ /^--gcs-address=/ && gcs == "") gcs = substr($i, 15)
                else if ($i ~ /^--node_id=/) node = substr($i, 11)
                else if ($i ~ /^--temp_dir=/) td = substr($i, 12)
            }
            n = split(gcs, part, ":")
            if (n < 2 || part[n] != port) next
            host = substr(gcs, 1, length(gcs) - length(port) - 1)
            if (hosts != "  " && index(hosts, " " host " ") == 0) next
            if (tdir != "" && td != tdir) next
            print $1, node, gcs
            exit
        }'
}

# dq_ray_status ADDRESS: `ray status` output for the cluster at ADDRESS ("auto": the local one).
dq_ray_status() {
    local args=(status)
    [[ $1 == auto ]] || args+=(--address "$1")
    # A GCS that does not answer makes `ray status` wait 40 s or more; give up earlier.
    timeout "${DQ_STATUS_TIMEOUT:-20}" ray "${args[@]}" 2>&1
}

# dq_cluster_total STATUS_TEXT RESOURCE: total of RESOURCE (CPU, NPU, GPU) in `ray status` output, as an integer.
dq_cluster_total() {
    awk -v res="$2" '
        /^Total Usage:/ { usage = 1; next }
        usage && /^ *$/ { exit }
        usage && $2 == res { split($1, a, "/"); printf "%d\n", a[2]; found = 1; exit }
        END { if (!found) print 0 }' <<<"$1"
}

dq_cluster_nodes() {  # dq_cluster_nodes STATUS_TEXT: active nodes
    awk '/^Active:/ { a = 1; next } a && /^[^ ]/ { exit } a && $2 ~ /^node_/ { n += $1 } END { print n + 0 }' <<<"$1"
}

# dq_wait_cluster ADDRESS SECONDS [NODES] [NODE_ID]: wait until `ray status` answers (and has NODES active nodes,
# and lists NODE_ID). Returns 1 on timeout; the last status is in DQ_LAST_STATUS.
dq_wait_cluster() {
    local address=$1 seconds=$2 nodes=${3:-0} node_id=${4:-} deadline
    deadline=$((SECONDS + seconds))
    DQ_LAST_STATUS=""
    while :; do
        # `ray status` waits long for a port nobody listens on yet: check the port first.
        if [[ $address != *:* ]] || dq_tcp_open "${address%:*}" "${address##*:}" 2 \
            && DQ_LAST_STATUS=$(dq_ray_status "$address") && [[ $DQ_LAST_STATUS == *"Node status"* ]]; then
            if (($(dq_cluster_nodes "$DQ_LAST_STATUS") >= nodes)) \
                && [[ -z $node_id || $DQ_LAST_STATUS == *"node_$node_id"* ]]; then
                return 0
            fi
        fi
        ((SECONDS < deadline)) || return 1
        sleep 1
    done
}

# Where Ray keeps its sessions: TEMP_DIR, else Ray's default ($RAY_TMPDIR, else $TMPDIR, else /tmp, plus /ray).
dq_ray_dir() { echo "${1:-${RAY_TMPDIR:-${TMPDIR:-/tmp}}/ray}"; }

# A note for the user's own shell when the scripts turned token authentication on.
dq_auth_note() {
    if [[ ${RAY_AUTH_MODE:-} == token ]]; then
        dq_info "  note:       Ray token authentication is on: give every node the same token (~/.ray/auth_token" \
                "or RAY_AUTH_TOKEN); dist-quant finds it by itself, 'ray status' needs 'export RAY_AUTH_MODE=token'"
    fi
}

dq_auth_hint() {  # dq_auth_hint LOG_TEXT: a hint when Ray refused for authentication
    if [[ $1 == *InvalidAuthToken* || $1 == *AuthenticationError* || $1 == *"token authentication"*"not found"* ]]; then
        dq_warn "Ray token authentication failed: every node and the driver need the head's token" \
                "(~/.ray/auth_token on the head; copy it, or set RAY_AUTH_TOKEN), or start all with RAY_AUTH_MODE=disabled"
    fi
}

# dq_block PID [TEMP_DIR]: stay in the foreground while PID (the raylet) lives; on INT/TERM stop this node's Ray
# (only the instance in TEMP_DIR when given).
dq_block() {
    local pid=$1
    DQ_BLOCK_TEMP_DIR=${2:-}
    # shellcheck disable=SC2317  # called by the trap
    dq__block_stop() {
        dq_info "signal received: stopping Ray on this node"
        bash "$DQ_LAUNCH_DIR/stop.sh" --force ${DQ_BLOCK_TEMP_DIR:+--temp-dir "$DQ_BLOCK_TEMP_DIR"} >/dev/null 2>&1 || true
        exit 0
    }
    trap dq__block_stop INT TERM
    dq_info "--block: staying in the foreground while Ray runs on this node (raylet pid $pid)"
    while kill -0 "$pid" 2>/dev/null; do
        sleep 5 &
        wait $! || true
    done
    dq_info "the raylet exited; leaving"
}

# dq_ray_start LOG ARGS...: run `ray start ARGS` with its output in LOG; on failure print the end of LOG.
dq_ray_start() {
    local log=$1
    shift
    dq_info "ray start $*"
    if ! ray start "$@" >"$log" 2>&1; then
        echo "----- last lines of $log -----" >&2
        tail -n 25 "$log" >&2
        echo "-----" >&2
        dq_auth_hint "$(cat "$log")"
        dq_die "ray start failed (full output: $log)"
    fi
}

# Run directly (bash launch/common.sh --help): say what this file is.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    cat <<HELP
Usage: source launch/common.sh   (from another bash script; running it does nothing else)

Helpers shared by start_head.sh, start_worker.sh, quant_cluster.sh, stop.sh and slurm_quant.sbatch:
$(grep -o '^dq_[a-z_]*()' "$0" | tr -d '()' | sed 's/^/  /')

Environment: DIST_QUANT_NPUS (NPU count of a node), ASCEND_ENV (CANN set_env.sh), RAY_AUTH_MODE (set to
"token" when a Ray token exists, as 'ray start --head' does on its own).
HELP
    exit 0
fi

# The absolute path of a folder (created), or nothing when none is given.
dq_abs_dir() {
    [[ -n ${1:-} ]] || return 0
    mkdir -p "$1"
    (cd "$1" && pwd -P)
}

# What every node needs before `ray start`: ray itself, the CANN environment, the cluster's auth setting.
dq_prepare_node() {
    dq_require_ray
    dq_source_cann
    dq_setup_auth
}
