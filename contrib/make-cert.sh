#!/bin/sh
# A self-signed certificate for popgate's TLS listeners: DIR/localhost.crt and DIR/localhost.key
# (the names the example config uses), EC P-256, for this host's name and localhost. The
# Debian package runs it once (as /usr/share/popgate/make-cert.sh /etc/popgate/certs popgate);
# replace the pair with a real certificate and `systemctl reload popgate`.
#
# Usage: make-cert.sh DIR [GROUP]   (GROUP: the key is made readable by it, mode 0640)
set -eu
dir=$1
group=${2:-}
name=$(hostname -f 2>/dev/null || hostname)
umask 077
mkdir -p "$dir"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 \
    -subj "/CN=$name" -addext "subjectAltName=DNS:$name,DNS:localhost" \
    -keyout "$dir/localhost.key" -out "$dir/localhost.crt" 2>/dev/null
chmod 0644 "$dir/localhost.crt"
if [ -n "$group" ]; then
    chgrp "$group" "$dir" "$dir/localhost.key" "$dir/localhost.crt"
    chmod 0750 "$dir"
    chmod 0640 "$dir/localhost.key"
fi
