#!/usr/bin/env bash
# Makes a Docker engine and nanokit's test images available, and prints the
# lines
#   export NANOKIT_TEST_DOCKER=1
#   export NANOKIT_TEST_CERTS=<dir>  NANOKIT_TEST_DOCKER_TLS_HOST=tcp://127.0.0.1:2376
# so that `eval "$(bash scripts/docker-test-env.sh)"` tells the Docker tests
# they may run. Idempotent and cheap when everything is already there:
#
#   1. installs Debian's `docker.io` (and `docker-compose`, the benchmark's
#      anchor, and `busybox-static`) when `dockerd` is missing (needs root);
#   2. starts `dockerd` in the background when `docker info` fails, and waits
#      for it (log: /tmp/nanokit-dockerd.log). It listens on the unix socket
#      and on tcp://127.0.0.1:2376 with --tlsverify (server certificate
#      loopback.pem from the test PKI, scripts/test-certs.sh, made first when
#      NANOKIT_TEST_CERTS is unset; clients need a certificate of its CA). A
#      dockerd already running without that TLS listener is restarted with it,
#      under `flock /tmp/nk-docker.lock` (the lock every Docker test run holds;
#      taken over when this script was started under it);
#   3. builds the test images locally (no registry is reachable):
#        nk-busybox:latest  a busybox-static rootfs (sh, nc, httpd, wget, …)
#        nk-node:latest     the same plus this machine's `node` binary, its
#                           shared libraries and npm
#      Each image is labelled with a hash of what went into it and rebuilt
#      only when that changes.
#
# When Docker cannot be had (no root, no apt, the daemon does not start), it
# prints a reason on stderr and no export line: outside CI the Docker tests are
# then reported as ignored/skipped (SKIPPED: …), in CI (CI=true) they fail.
set -uo pipefail

log() { echo "docker-test-env: $*" >&2; }

if ! command -v dockerd >/dev/null 2>&1 || ! command -v busybox >/dev/null 2>&1 \
  || ! command -v docker-compose >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing docker.io, docker-compose and busybox-static"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq docker.io docker-compose busybox-static; } >&2 \
      || { log "apt-get install failed; Docker tests will be skipped"; exit 0; }
  else
    log "dockerd is not installed and cannot be installed here; Docker tests will be skipped"
    exit 0
  fi
fi

# The test PKI for dockerd's TLS listener.
if [ -z "${NANOKIT_TEST_CERTS:-}" ] || [ ! -f "$NANOKIT_TEST_CERTS/.complete" ]; then
  eval "$(bash "$(dirname "$0")/test-certs.sh")" || { log "cannot make the test PKI"; exit 0; }
fi
certs="$NANOKIT_TEST_CERTS"
tls_host=tcp://127.0.0.1:2376

start_dockerd() {
  log "starting dockerd (unix socket and $tls_host with --tlsverify)"
  # dockerd outlives this script, in a session of its own (a kill of the
  # caller's process group must not take it down); it must not inherit the Docker lock's
  # descriptor (or any other above stderr), or the lock is held for good.
  (
    for fd in /proc/self/fd/*; do
      n="${fd##*/}"
      [ "$n" -gt 2 ] 2>/dev/null && eval "exec $n>&-"
    done
    exec setsid nohup /usr/sbin/dockerd -H unix:///var/run/docker.sock -H "$tls_host" --tlsverify \
      --tlscacert "$certs/ca.pem" --tlscert "$certs/loopback.pem" --tlskey "$certs/loopback-key.pem" \
      >/tmp/nanokit-dockerd.log 2>&1 </dev/null
  ) &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
}

# Whether dockerd answers on the TLS listener with the test client certificate.
tls_ok() {
  docker -H "$tls_host" --tlsverify --tlscacert "$certs/ca.pem" --tlscert "$certs/client.pem" \
    --tlskey "$certs/client-key.pem" version >/dev/null 2>&1
}

if ! docker info >/dev/null 2>&1 || ! tls_ok; then
  # Under the Docker lock: nobody's tests use the daemon while it restarts.
  # When this script runs under `flock /tmp/nk-docker.lock`, the lock's file
  # descriptor is inherited: locking it again succeeds at once.
  lock_fd=""
  for fd in /proc/$$/fd/*; do
    [ "$(readlink "$fd" 2>/dev/null)" = /tmp/nk-docker.lock ] && lock_fd="${fd##*/}"
  done
  if [ -z "$lock_fd" ]; then
    exec 9>>/tmp/nk-docker.lock
    lock_fd=9
  fi
  flock -w 1800 "$lock_fd" || { log "cannot take /tmp/nk-docker.lock; Docker tests will be skipped"; exit 0; }
  if ! docker info >/dev/null 2>&1; then
    start_dockerd
  elif ! tls_ok; then
    pid=$(cat /var/run/docker.pid 2>/dev/null || true)
    if [ -n "$pid" ]; then
      log "restarting dockerd $pid to add the TLS listener $tls_host"
      kill "$pid"
      for _ in $(seq 1 120); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
      done
    fi
    start_dockerd
  fi
  if ! docker info >/dev/null 2>&1; then
    log "dockerd did not come up (see /tmp/nanokit-dockerd.log); Docker tests will be skipped"
    tail -n 20 /tmp/nanokit-dockerd.log >&2 || true
    exit 0
  fi
  tls_ok || log "dockerd does not answer on $tls_host with the test certificates (see /tmp/nanokit-dockerd.log); the Docker TLS tests will fail"
fi

# Builds image $1 from the rootfs folder $2 unless an image with the same
# content hash label already exists.
import_rootfs() {
  local image="$1" root="$2" hash
  hash=$(cd "$root" && find . -printf '%p %s %m %l\n' | LC_ALL=C sort | sha256sum | cut -c1-16)
  if [ "$(docker image inspect -f '{{ index .Config.Labels "nk.rootfs" }}' "$image" 2>/dev/null)" = "$hash" ]; then
    return 0
  fi
  log "building $image"
  local old
  old=$(docker image inspect -f '{{ .Id }}' "$image" 2>/dev/null || true)
  tar -C "$root" -c . | docker import \
    -c "LABEL nk.rootfs=$hash" -c 'ENV PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin' \
    -c 'CMD ["sh"]' - "$image" >/dev/null
  # The previous build, if that left it without any tag: remove it unless a
  # container uses it.
  if [ -n "$old" ] && [ "$(docker image inspect -f '{{ len .RepoTags }}' "$old" 2>/dev/null)" = 0 ]; then
    docker image rm "$old" >/dev/null 2>&1 || true
  fi
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# nk-busybox: busybox-static with every applet linked, and /tmp.
bb="$work/busybox"
mkdir -p "$bb/bin" "$bb/tmp" "$bb/etc" "$bb/root"
chmod 1777 "$bb/tmp"
cp "$(command -v busybox)" "$bb/bin/busybox"
for applet in $("$bb/bin/busybox" --list); do
  [ -e "$bb/bin/$applet" ] || ln -s busybox "$bb/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$bb/etc/passwd"
printf 'root:x:0:\n' >"$bb/etc/group"
printf '127.0.0.1 localhost\n' >"$bb/etc/hosts"
import_rootfs nk-busybox:latest "$bb" || { log "docker import failed"; exit 0; }

# nk-node: the busybox rootfs plus node, its libraries and npm.
node_bin=$(readlink -f "$(command -v node)")
nd="$work/node"
cp -a "$bb" "$nd"
mkdir -p "$nd/usr/local/bin" "$nd/usr/bin"
ln -s /bin/busybox "$nd/usr/bin/env"  # for `#!/usr/bin/env node` scripts
cp "$node_bin" "$nd/usr/local/bin/node"
for lib in $(ldd "$node_bin" | awk '/=>/ { print $3 } /^[ \t]*\/lib/ { print $1 }'); do
  mkdir -p "$nd$(dirname "$lib")"
  cp -L "$lib" "$nd$lib"
done
npm_dir=$(dirname "$(dirname "$(readlink -f "$(command -v npm)")")")
if [ -d "$npm_dir" ]; then
  mkdir -p "$nd/usr/local/lib/node_modules"
  cp -a "$npm_dir" "$nd/usr/local/lib/node_modules/npm"
  ln -s ../lib/node_modules/npm/bin/npm-cli.js "$nd/usr/local/bin/npm"
fi
import_rootfs nk-node:latest "$nd" || { log "docker import failed"; exit 0; }

echo "export NANOKIT_TEST_DOCKER=1"
echo "export NANOKIT_TEST_CERTS='$certs'"
tls_ok && echo "export NANOKIT_TEST_DOCKER_TLS_HOST=$tls_host"
