#!/usr/bin/env bash
# Makes (or reuses) the test PKI for the TLS tests and prints
#   export NANOKIT_TEST_CERTS=<dir>
# so that `eval "$(bash scripts/test-certs.sh)"` sets it. Idempotent: a complete
# set already there is kept. Never meant for anything but loopback tests.
#
# In $NANOKIT_TEST_CERTS (default /tmp/nanokit-test-certs):
#   ca.pem, ca-key.pem                the test CA
#   other-ca.pem, other-ca-key.pem    an unrelated CA ("the wrong CA")
#   localhost.pem, localhost-key.pem  server certificate, SAN DNS:localhost only
#                                     (no IP: connecting by 127.0.0.1 must fail
#                                     host-name verification)
#   loopback.pem, loopback-key.pem    server certificate, SAN DNS:localhost and
#                                     IP:127.0.0.1 (dockerd on tcp://127.0.0.1)
#   client.pem, client-key.pem        client certificate from the test CA,
#                                     CN=nanokit-cert (PostgreSQL `cert` auth
#                                     maps the CN to that role), EKU clientAuth
#   other-client.pem, other-client-key.pem
#                                     client certificate from the wrong CA
# Keys are PKCS#8 PEM, mode 0644 (the tests run servers as other users; the
# PostgreSQL test cluster copies its key and makes the copy 0600). The set is
# made in a scratch directory and renamed into place whole, so a run killed
# half-way or two runs at once never leave a partial set.
set -euo pipefail

dir="${NANOKIT_TEST_CERTS:-/tmp/nanokit-test-certs}"
if [ -f "$dir/.complete" ]; then
  echo "export NANOKIT_TEST_CERTS='$dir'"
  exit 0
fi
command -v openssl >/dev/null 2>&1 || { echo "test-certs: openssl is not on PATH" >&2; exit 1; }
mkdir -p "$(dirname "$dir")"
work="$(mktemp -d "$dir.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cd "$work"

# ca NAME CN
ca() {
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=$2" \
    -keyout "$1-key.pem" -out "$1.pem" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
}

# leaf NAME CA CN EXTFILE-CONTENT
leaf() {
  local ext
  ext="$(mktemp)"
  printf '%s\n' "$4" >"$ext"
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$3" -keyout "$1-key.pem" -out "$1.csr" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2-key.pem" -CAcreateserial \
    -days 3650 -extfile "$ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$ext"
}

ca ca "nanokit test CA"
ca other-ca "nanokit wrong CA"
leaf localhost ca localhost "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost"
leaf loopback ca localhost "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1"
leaf client ca nanokit-cert "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
leaf other-client other-ca nanokit-cert "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
rm -f ./*.srl
chmod 0755 "$work"
chmod 0644 ./*.pem
touch .complete
# Another run may have finished first: keep its set.
mv -T "$work" "$dir" 2>/dev/null || [ -f "$dir/.complete" ] || { echo "test-certs: cannot create $dir" >&2; exit 1; }

echo "export NANOKIT_TEST_CERTS='$dir'"
