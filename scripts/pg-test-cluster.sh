#!/usr/bin/env bash
# Starts (or reuses) a throwaway PostgreSQL cluster on 127.0.0.1 for the
# state-store tests, and prints the line
#   export NANOKIT_TEST_PG_URL=postgres://…
# so that `eval "$(scripts/pg-test-cluster.sh)"` sets it (and
#   export NANOKIT_TEST_CERTS=…, the test PKI it uses, see below).
# Idempotent: when the cluster is already running it is reused (its TLS
# settings brought up to date and reloaded when they changed, so a cluster
# started by an older version of this script gets them too).
#
#   scripts/pg-test-cluster.sh          start or reuse, print the export lines
#   scripts/pg-test-cluster.sh stop     stop the cluster and delete it
#
# The cluster lives in $NANOKIT_PG_TEST_DIR (default /tmp/nanokit-pg-test),
# listens only on 127.0.0.1 (and a Unix socket in that directory), and is
# never meant for real data. PostgreSQL refuses to run as root, so as root the
# cluster is owned by the unprivileged user $NANOKIT_PG_TEST_USER (default
# nanokit-pg), created when missing.
#
# TLS (for tests/pg_tls.rs): ssl=on with $NANOKIT_TEST_CERTS/localhost.pem
# (SAN DNS:localhost only; scripts/test-certs.sh makes the set when
# NANOKIT_TEST_CERTS is unset), ssl_ca_file = the test CA (client
# certificates). pg_hba.conf:
#   - the owner (the URL's user) and any other role: trust, plain or TLS;
#   - nanokit-tlsonly: TLS only (a plain connection is rejected);
#   - nanokit-cert: TLS only, `cert` authentication (a client certificate from
#     the test CA with CN=nanokit-cert).
# Both roles may read and write every table and create tables in public.
set -euo pipefail

dir="${NANOKIT_PG_TEST_DIR:-/tmp/nanokit-pg-test}"
pguser="${NANOKIT_PG_TEST_USER:-nanokit-pg}"
data="$dir/data"
log="$dir/postgres.log"

for tool in initdb pg_ctl postgres psql; do
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
  rm -rf "$dir" "$dir.lock"
  echo "pg-test-cluster: stopped and removed $dir" >&2
  exit 0
fi

# The test PKI.
certs_export=""
if [ -z "${NANOKIT_TEST_CERTS:-}" ]; then
  certs_export="$(bash "$(dirname "$0")/test-certs.sh")"
  eval "$certs_export"
fi
certs="$NANOKIT_TEST_CERTS"
for f in localhost.pem localhost-key.pem ca.pem; do
  [ -r "$certs/$f" ] || { echo "pg-test-cluster: $certs/$f is missing; run scripts/test-certs.sh (or unset NANOKIT_TEST_CERTS)" >&2; exit 1; }
done

# Prints the export lines.
exports() {
  echo "export NANOKIT_TEST_PG_URL='$(url_for "$1")'"
  echo "export NANOKIT_TEST_CERTS='$certs'"
}

# Copies $1 to $data/$2 (mode $3, owned by the cluster's owner) when it
# differs; says whether it changed (exit 0) or not (1).
install_file() {
  if [ -f "$data/$2" ] && cmp -s "$1" "$data/$2"; then return 1; fi
  cp "$1" "$data/$2.tmp"
  chmod "$3" "$data/$2.tmp"
  if [ "$(id -u)" = 0 ]; then chown "$pguser" "$data/$2.tmp"; fi
  mv -f "$data/$2.tmp" "$data/$2"
}

# Brings the cluster's TLS settings and pg_hba.conf up to date; exit 0 when
# something changed (a running server must reload).
configure_tls() {
  local changed=1 tmp
  tmp="$(mktemp)"
  install_file "$certs/localhost.pem" server.crt 0644 && changed=0
  install_file "$certs/localhost-key.pem" server.key 0600 && changed=0
  install_file "$certs/ca.pem" root.crt 0644 && changed=0
  printf '%s\n' "# Written by scripts/pg-test-cluster.sh." "ssl = on" \
    "ssl_cert_file = 'server.crt'" "ssl_key_file = 'server.key'" "ssl_ca_file = 'root.crt'" >"$tmp"
  install_file "$tmp" nanokit-tls.conf 0644 && changed=0
  cat >"$tmp" <<'HBA'
# Written by scripts/pg-test-cluster.sh (first match wins).
local     all          all                                        trust
hostnossl all          nanokit-tlsonly,nanokit-cert 127.0.0.1/32  reject
hostnossl all          nanokit-tlsonly,nanokit-cert ::1/128       reject
hostssl   all          nanokit-cert                 127.0.0.1/32  cert
hostssl   all          nanokit-cert                 ::1/128       cert
host      all          all                          127.0.0.1/32  trust
host      all          all                          ::1/128       trust
local     replication  all                                        trust
host      replication  all                          127.0.0.1/32  trust
host      replication  all                          ::1/128       trust
HBA
  install_file "$tmp" pg_hba.conf 0600 && changed=0
  rm -f "$tmp"
  if ! grep -qx "include_if_exists = 'nanokit-tls.conf'" "$data/postgresql.conf"; then
    echo "include_if_exists = 'nanokit-tls.conf'" >>"$data/postgresql.conf"
    changed=0
  fi
  return "$changed"
}

# The roles of the TLS tests (idempotent, safe when two runs race).
create_roles() {
  as_owner psql -X -q -h "$dir" -p "$1" -U "$(owner_name)" -d postgres -v ON_ERROR_STOP=1 >/dev/null <<'SQL'
SET client_min_messages = warning;
DO $$
DECLARE r text;
BEGIN
  FOREACH r IN ARRAY ARRAY['nanokit-tlsonly', 'nanokit-cert'] LOOP
    BEGIN
      EXECUTE format('CREATE ROLE %I LOGIN', r);
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
    END;
  END LOOP;
END $$;
GRANT pg_read_all_data, pg_write_all_data TO "nanokit-tlsonly", "nanokit-cert";
GRANT USAGE, CREATE ON SCHEMA public TO "nanokit-tlsonly", "nanokit-cert";
SQL
}

# Waits until a TLS connection by localhost works (a reload is asynchronous).
wait_for_tls() {
  local i
  for i in $(seq 1 50); do
    if [ "$(psql -X -At "host=localhost port=$1 user=$(owner_name) dbname=postgres sslmode=verify-full sslrootcert=$certs/ca.pem connect_timeout=5" \
      -c 'SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()' 2>/dev/null)" = t ]; then
      return 0
    fi
    sleep 0.2
  done
  echo "pg-test-cluster: TLS to 127.0.0.1:$1 does not work; the server log:" >&2
  tail -n 30 "$log" >&2 || true
  exit 1
}


# One run at a time (sessions share the cluster).
exec 9>"$dir.lock"
flock -w 120 9 || echo "pg-test-cluster: another run holds $dir.lock for 2 min; going on" >&2

if port="$(running_port)"; then
  if configure_tls; then
    as_owner pg_ctl reload -D "$data" >/dev/null 9>&-
    echo "pg-test-cluster: updated the TLS settings of the cluster on 127.0.0.1:$port and reloaded it" >&2
  fi
  create_roles "$port"
  wait_for_tls "$port"
  echo "pg-test-cluster: reusing the cluster on 127.0.0.1:$port ($dir)" >&2
  exports "$port"
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

configure_tls || true

# A free port on 127.0.0.1.
port=""
for p in $(seq 55432 55532); do
  if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then port="$p"; break; fi
done
[ -n "$port" ] || { echo "pg-test-cluster: no free port in 55432-55532" >&2; exit 1; }

if ! as_owner pg_ctl start -w -t 60 -D "$data" -l "$log" 9>&- \
  -o "-k $dir -h 127.0.0.1 -p $port -c max_connections=200 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" >/dev/null; then
  echo "pg-test-cluster: the server did not start; its log:" >&2
  tail -n 30 "$log" >&2 || true
  exit 1
fi
echo "$port" >"$dir/port"
create_roles "$port"
wait_for_tls "$port"
echo "pg-test-cluster: started PostgreSQL on 127.0.0.1:$port ($dir)" >&2
exports "$port"
