#!/usr/bin/env bash
# Starts (or reuses) a throwaway PostgreSQL cluster on 127.0.0.1 for the
# state-store tests, and prints the line
#   export NANOKIT_TEST_PG_URL=postgres://…
# so that `eval "$(scripts/pg-test-cluster.sh)"` sets it. Idempotent: when
# the cluster is already running it only prints the URL.
#
#   scripts/pg-test-cluster.sh          start or reuse, print the export line
#   scripts/pg-test-cluster.sh stop     stop the cluster and delete it
#
# The cluster lives in $NANOKIT_PG_TEST_DIR (default /tmp/nanokit-pg-test),
# listens only on 127.0.0.1 (and a Unix socket in that directory), uses trust
# authentication, and is never meant for real data. PostgreSQL refuses to run
# as root, so as root the cluster is owned by the unprivileged user
# $NANOKIT_PG_TEST_USER (default nanokit-pg), created when missing.
set -euo pipefail

dir="${NANOKIT_PG_TEST_DIR:-/tmp/nanokit-pg-test}"
pguser="${NANOKIT_PG_TEST_USER:-nanokit-pg}"
data="$dir/data"
log="$dir/postgres.log"

for tool in initdb pg_ctl postgres; do
  command -v "$tool" >/dev/null 2>&1 || { echo "pg-test-cluster: $tool is not on PATH" >&2; exit 1; }
done

# Runs a command as the cluster's owner.
as_owner() {
  if [ "$(id -u)" = 0 ]; then
    if command -v runuser >/dev/null 2>&1; then
      runuser -u "$pguser" -- "$@"
    else
      su -s /bin/sh "$pguser" -c "$(printf '%q ' "$@")"
    fi
  else
    "$@"
  fi
}

owner_name() {
  if [ "$(id -u)" = 0 ]; then echo "$pguser"; else id -un; fi
}

url_for() {
  echo "postgres://$(owner_name)@127.0.0.1:$1/postgres?connect_timeout=5"
}

running_port() {
  [ -f "$dir/port" ] || return 1
  local port
  port="$(cat "$dir/port")"
  as_owner pg_ctl status -D "$data" >/dev/null 2>&1 || return 1
  # Answers on TCP?
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || return 1
  echo "$port"
}

if [ "${1:-}" = stop ]; then
  if [ -d "$data" ]; then
    as_owner pg_ctl stop -D "$data" -m fast >/dev/null 2>&1 || true
  fi
  rm -rf "$dir"
  echo "pg-test-cluster: stopped and removed $dir" >&2
  exit 0
fi

if port="$(running_port)"; then
  echo "pg-test-cluster: reusing the cluster on 127.0.0.1:$port ($dir)" >&2
  echo "export NANOKIT_TEST_PG_URL='$(url_for "$port")'"
  exit 0
fi

if [ "$(id -u)" = 0 ] && ! id -u "$pguser" >/dev/null 2>&1; then
  useradd --system --no-create-home --shell /usr/sbin/nologin "$pguser" 2>/dev/null \
    || useradd -r -M -s /bin/false "$pguser"
fi

mkdir -p "$dir"
chmod 0755 "$dir"
if [ "$(id -u)" = 0 ]; then chown "$pguser" "$dir"; fi
# The owner must be able to reach the directory.
if ! as_owner test -w "$dir"; then
  echo "pg-test-cluster: $(owner_name) cannot write to $dir; set NANOKIT_PG_TEST_DIR to a directory it can reach" >&2
  exit 1
fi

# A stale cluster (crashed, machine restarted): stop it if half-running.
if [ -d "$data" ]; then
  as_owner pg_ctl stop -D "$data" -m immediate >/dev/null 2>&1 || true
  rm -f "$data/postmaster.pid"
fi

if [ ! -f "$data/PG_VERSION" ]; then
  rm -rf "$data"
  as_owner initdb -D "$data" -A trust -U "$(owner_name)" -E UTF8 --no-instructions >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; exit 1; }
fi

# A free port on 127.0.0.1.
port=""
for p in $(seq 55432 55532); do
  if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then port="$p"; break; fi
done
[ -n "$port" ] || { echo "pg-test-cluster: no free port in 55432-55532" >&2; exit 1; }

if ! as_owner pg_ctl start -w -t 60 -D "$data" -l "$log" \
  -o "-k $dir -h 127.0.0.1 -p $port -c max_connections=200 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" >/dev/null; then
  echo "pg-test-cluster: the server did not start; its log:" >&2
  tail -n 30 "$log" >&2 || true
  exit 1
fi
echo "$port" >"$dir/port"
echo "pg-test-cluster: started PostgreSQL on 127.0.0.1:$port ($dir)" >&2
echo "export NANOKIT_TEST_PG_URL='$(url_for "$port")'"
