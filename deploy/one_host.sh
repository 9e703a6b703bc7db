#!/usr/bin/env bash
# A whole secure federation on this host, with the same commands a many-host deployment uses
# (deploy/README.md): TLS material, a SuperLink with TLS and SuperNode authentication, one
# registered key per SuperNode, N data-owner daemons, and the coordinator following the job.
#
#   deploy/one_host.sh WORKDIR JOB_DIR DATA1.jsonl [DATA2.jsonl ...]
#
# One SuperNode per data file. JOB_DIR holds job.json + bundle/ (see offsite.cloud.fed_job); pass
# JOB_DIR as "-" to bring the federation up and keep it running until Ctrl-C.
# Needs `offsite`, `flower-superlink` and `flwr` on PATH (activate the virtualenv first).
# Environment: SUPERLINK_PORT (default 9093), RUNTIME_PORT_BASE (default 9194; node i uses base+i).
set -euo pipefail

if [ "$#" -lt 3 ]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
WORK=$(realpath -m "$1"); JOB=$2; shift 2
SUPERLINK_PORT=${SUPERLINK_PORT:-9093}
RUNTIME_PORT_BASE=${RUNTIME_PORT_BASE:-9194}
SUPERLINK=127.0.0.1:$SUPERLINK_PORT
CERTS=$WORK/certs
export FLWR_HOME=$WORK/flwr_home
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
mkdir -p "$WORK/logs" "$FLWR_HOME"

PIDS=()
stop_all() {
    # our own children only, by PID: the daemons first (each stops its SuperNode), then the SuperLink
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill -TERM "${PIDS[i]}" 2>/dev/null || true
        wait "${PIDS[i]}" 2>/dev/null || true
    done
}
trap stop_all EXIT
trap 'exit 130' INT TERM

# 1. TLS + node keys (operator). Reused if present.
if [ ! -f "$CERTS/ca.key" ]; then
    offsite deploy certs --out "$CERTS" --nodes "$#"
fi

# 2. SuperLink: TLS on its one port, only registered SuperNode keys accepted.
flower-superlink --host 127.0.0.1 --port "$SUPERLINK_PORT" --database "$WORK/superlink.db" \
    --ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.crt" --ssl-keyfile "$CERTS/server.key" \
    --enable-supernode-auth >"$WORK/logs/superlink.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$SUPERLINK_PORT") 2>/dev/null && break
    kill -0 "${PIDS[0]}" 2>/dev/null || { echo "SuperLink died; see $WORK/logs/superlink.log" >&2; exit 1; }
    sleep 0.3
done
echo "SuperLink on $SUPERLINK (log $WORK/logs/superlink.log)"

# 3. Register each SuperNode's public key (this also writes the flwr CLI's connection to
#    $FLWR_HOME/config.toml; the Control API shares the SuperLink's port).
keys=()
for ((i = 0; i < $#; i++)); do keys+=("$CERTS/nodes/node-$i.pub"); done
offsite deploy register --superlink "$SUPERLINK" --root-certificates "$CERTS/ca.crt" --flwr-home "$FLWR_HOME" "${keys[@]}"

# 4. The data owners' daemons (normally one per host: see deploy/systemd/offsite-client.service).
i=0
for data in "$@"; do
    offsite client start --superlink "$SUPERLINK" --data "$data" \
        --root-certificates "$CERTS/ca.crt" --auth-key "$CERTS/nodes/node-$i" \
        --cache-dir "$WORK/cache-$i" --runtime-port $((RUNTIME_PORT_BASE + i)) --threads 1 \
        --log-file "$WORK/logs/supernode-$i.log" >"$WORK/logs/daemon-$i.log" 2>&1 &
    PIDS+=($!)
    i=$((i + 1))
done
for _ in $(seq 1 120); do  # until every registered SuperNode is online
    online=$(flwr supernode list --format json | grep -c '"status": "online"' || true)
    [ "$online" -ge "$#" ] && break
    sleep 1
done
flwr supernode list

# 5. The coordinator.
if [ "$JOB" = "-" ]; then
    echo "federation up; Ctrl-C stops it"
    wait "${PIDS[0]}"
else
    offsite cloud run --job "$JOB" --superlink "$SUPERLINK" --root-certificates "$CERTS/ca.crt"
fi
