#!/usr/bin/env bash
# Regenerates the development CA and the localhost server certificate used by `popgate demo`.
# NOT for production: the private keys are public in this repository.
# Run from anywhere: bash certs/generate.sh
set -euo pipefail
cd "$(dirname "$0")"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
  -subj "/CN=popgate development CA" -keyout dev-ca.key -out dev-ca.crt \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj "/CN=localhost" -keyout localhost.key -out localhost.csr
openssl x509 -req -in localhost.csr -CA dev-ca.crt -CAkey dev-ca.key -CAcreateserial \
  -days 3650 -out localhost.crt \
  -extfile <(printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1" \
    "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth")
rm -f localhost.csr dev-ca.srl
openssl verify -CAfile dev-ca.crt localhost.crt
