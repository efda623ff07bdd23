#!/usr/bin/env bash
# A throwaway Garage S3 cluster (1 or 3 nodes) on loopback, for tests that need a real S3 server.
#   garage.sh start DIR NODES   new cluster under DIR (new or empty); writes DIR/env and prints it
#   garage.sh stop DIR          SIGKILLs every node of DIR and waits until they are gone
#   garage.sh kill DIR N        SIGKILLs node N only (a node failure mid-workload)
# The binary is ${KVFERRY_GARAGE:-garage} (tried on PATH, then ~/.cargo/bin); needs python3 and a
# curl with --aws-sigv4 (7.75+).
set -euo pipefail
shopt -s nullglob

usage() { echo "usage: $0 start DIR 1|3 | stop DIR | kill DIR N" >&2; exit 2; }

garage=${KVFERRY_GARAGE:-garage}
# Garage reads GARAGE_* (RPC host, secret, config path...) over its config: none from the caller.
unset "${!GARAGE_@}"
if ! command -v "$garage" >/dev/null; then
    if [[ -z ${KVFERRY_GARAGE:-} && -x $HOME/.cargo/bin/garage ]]; then
        garage=$HOME/.cargo/bin/garage
    else
        echo "garage.sh: no Garage binary '$garage' (install Garage 2.x, e.g." \
            "'cargo install garage --locked', or set KVFERRY_GARAGE)" >&2
        exit 2
    fi
fi

# A pid file can outlive its process and the pid be reused: only a live garage started with this
# node's config counts (a zombie is gone too, in case nothing reaps it).
alive() { # PID CONFIG
    local state
    [[ -r /proc/$1/stat ]] || return 1
    read -r _ _ state _ 2>/dev/null <"/proc/$1/stat" || return 1
    [[ $state != Z ]] && tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -qF -- "$2"
}

# SIGKILLs the given nodes (numbers; none: all) of $dir and waits up to 10 s for them to be gone.
kill_nodes() {
    local n pid end=$((SECONDS + 10)) nums=("$@")
    ((${#nums[@]})) || mapfile -t nums < <(node_numbers)
    for n in "${nums[@]}"; do
        pid=$(cat "$dir/node$n/pid" 2>/dev/null) || continue
        if alive "$pid" "$dir/node$n/garage.toml"; then kill -KILL "$pid" 2>/dev/null || true; fi
    done
    for n in "${nums[@]}"; do
        pid=$(cat "$dir/node$n/pid" 2>/dev/null) || continue
        while alive "$pid" "$dir/node$n/garage.toml"; do
            ((SECONDS < end)) || { echo "garage.sh: node $n (pid $pid) did not exit" >&2; return 1; }
            sleep 0.1
        done
    done
}

node_numbers() { local d; for d in "$dir"/node*/; do d=${d%/}; echo "${d##*node}"; done; }

g() { local n=$1; shift; "$garage" -c "$dir/node$n/garage.toml" "$@"; }

# One field of a JSON object on stdin.
json() { python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

# Runs "$@" until it succeeds, until the start's deadline, or until a node has died.
poll() { # WHAT CMD...
    local what=$1 out n
    shift
    while ! out=$("$@" 2>&1); do
        for n in $(seq "$nodes"); do
            alive "$(cat "$dir/node$n/pid")" "$dir/node$n/garage.toml" ||
                { echo "garage.sh: node $n exited while waiting for $what" >&2; return 1; }
        done
        if ((SECONDS >= deadline)); then
            printf 'garage.sh: timed out waiting for %s; last output:\n%s\n' "$what" "$out" >&2
            return 1
        fi
        sleep 0.2
    done
    printf '%s' "$out"
}

# Health as seen from node N equals the wanted "status connectedNodes storageNodesUp".
health_is() { # N WANTED
    local h
    h=$(g "$1" json-api GetClusterHealth) || return 1
    [[ $(python3 -c 'import json, sys; h = json.load(sys.stdin)
print(h["status"], h["connectedNodes"], h["storageNodesUp"])' <<<"$h") == "$2" ]] ||
        { echo "$h"; return 1; }
}

# A signed HEAD of the bucket through node N's S3 port: key, bucket and permission all visible there.
# Garage wants x-amz-content-sha256, which older curls do not add (this one: of the empty body).
bucket_ok() { # N
    local code
    code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 5 -I --aws-sigv4 aws:amz:garage:s3 \
        --user "$key_id:$secret" -H "x-amz-content-sha256: $(sha256sum </dev/null | cut -d' ' -f1)" \
        "http://127.0.0.1:${s3_port[$1]}/kvferry") || true
    [[ $code == 200 ]] || { echo "HTTP $code"; return 1; }
}

on_failure() {
    local log
    trap - EXIT
    for log in "$dir"/node*/log; do
        echo "---- tail of $log" >&2
        tail -n 30 "$log" >&2
    done
    kill_nodes || true
    echo "garage.sh: start failed" >&2
    exit 1
}

start() {
    [[ $nodes == 1 || $nodes == 3 ]] || usage
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    [[ -z $(ls -A "$dir") ]] || { echo "garage.sh: $dir is not empty" >&2; exit 1; }
    trap on_failure EXIT
    trap 'exit 1' INT TERM HUP
    deadline=$((SECONDS + 60))

    # All ports in one go, every socket held until the last is bound, so they differ.
    local ports secret_rpc n i
    read -r -a ports <<<"$(python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' $((2 * nodes)))"
    secret_rpc=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
    s3_port=() rpc_port=() pids=() id=()
    for n in $(seq "$nodes"); do
        i=$((2 * (n - 1)))
        s3_port[n]=${ports[i]}
        rpc_port[n]=${ports[i + 1]}
        mkdir -p "$dir/node$n/meta" "$dir/node$n/data"
        # rpc_public_addr makes `node id` print the full id@addr that `node connect` takes.
        cat >"$dir/node$n/garage.toml" <<EOF
metadata_dir = "$dir/node$n/meta"
data_dir = "$dir/node$n/data"
db_engine = "sqlite"
replication_factor = $nodes
rpc_bind_addr = "127.0.0.1:${rpc_port[n]}"
rpc_public_addr = "127.0.0.1:${rpc_port[n]}"
rpc_secret = "$secret_rpc"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:${s3_port[n]}"
EOF
        # No inherited stdio: a caller reading our output must not wait for the servers.
        NO_COLOR=1 "$garage" -c "$dir/node$n/garage.toml" server </dev/null >"$dir/node$n/log" 2>&1 &
        pids[n]=$!
        disown "${pids[n]}" # outlives this script; no job notice when killed on failure
        echo "${pids[n]}" >"$dir/node$n/pid"
    done

    # The CLI talks to its node over RPC, so a GetClusterHealth answer means the node is up.
    for n in $(seq "$nodes"); do
        id[n]=$(poll "node $n's id" g "$n" node id -q)
        poll "node $n's RPC" g "$n" json-api GetClusterHealth >/dev/null
    done
    for n in $(seq 2 "$nodes"); do
        poll "node 1 to connect to node $n" g 1 node connect "${id[n]}" >/dev/null
    done
    # connectedNodes counts the node itself; no storage nodes until the layout is applied.
    poll "the nodes to see each other" health_is 1 "unavailable $nodes 0" >/dev/null
    g 1 layout assign -z dc1 -c 1G "${id[@]%@*}" >/dev/null
    g 1 layout apply --version 1 >/dev/null
    for n in $(seq "$nodes"); do
        poll "node $n to be healthy" health_is "$n" "healthy $nodes $nodes" >/dev/null
    done

    g 1 bucket create kvferry >/dev/null
    local created key_id secret
    created=$(g 1 json-api CreateKey '{"name": "kvferry"}')
    key_id=$(json accessKeyId <<<"$created")
    secret=$(json secretAccessKey <<<"$created")
    g 1 bucket allow --read --write --owner kvferry --key "$key_id" >/dev/null
    for n in $(seq "$nodes"); do
        poll "the bucket through node $n's S3 port" bucket_ok "$n" >/dev/null
    done

    {
        echo "AWS_ACCESS_KEY_ID=$key_id"
        echo "AWS_SECRET_ACCESS_KEY=$secret"
        echo "AWS_REGION=garage"
        echo "AWS_DEFAULT_REGION=garage"
        echo "AWS_ENDPOINT=http://127.0.0.1:${s3_port[1]}"
        echo "AWS_ALLOW_HTTP=true"
        echo "KVFERRY_S3_BUCKET=kvferry"
        for n in $(seq "$nodes"); do
            echo "GARAGE_NODE${n}_S3=http://127.0.0.1:${s3_port[n]}"
            echo "GARAGE_NODE${n}_PID=${pids[n]}"
        done
    } >"$dir/env"
    trap - EXIT INT TERM HUP
    cat "$dir/env"
}

case ${1:-} in
start) (($# == 3)) || usage; dir=$2 nodes=$3; start ;;
stop) (($# == 2)) || usage; dir=$(cd "$2" && pwd); kill_nodes ;;
kill) (($# == 3)) || usage; dir=$(cd "$2" && pwd); [[ -f $dir/node$3/pid ]] || usage; kill_nodes "$3" ;;
*) usage ;;
esac
