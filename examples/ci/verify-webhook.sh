#!/bin/sh
# Verify a distill webhook delivery with openssl:
#   verify-webhook.sh SECRET TIMESTAMP SIGNATURE BODY_FILE
# TIMESTAMP and SIGNATURE are the X-Distill-Timestamp and X-Distill-Signature headers; BODY_FILE
# holds the raw request body. Prints "ok" and exits 0, or says why not and exits 1.
set -eu
secret=$1 timestamp=$2 signature=$3 body=$4
now=$(date +%s)
age=$((now - timestamp))
if [ "${age#-}" -gt 300 ]; then
  echo "timestamp is ${age}s from now: older than the 300 s replay window" >&2
  exit 1
fi
mac=$({ printf '%s.' "$timestamp"; cat "$body"; } | openssl dgst -sha256 -hmac "$secret" | sed 's/^.* //')
if [ "v1=$mac" != "$signature" ]; then
  echo "signature does not match" >&2
  exit 1
fi
echo ok
