#!/bin/sh
# Container entrypoint for syncnode.
#   (no argument) or "run [flags]"  create the node in $SYNCNODE_DATA on first start, then
#                                   run it (exec: syncnode gets SIGTERM from `docker stop`)
#   healthcheck                     exit 0 if the admin API answers /healthz, else 1
#   anything else                   passed to syncnode (e.g. `id`, `peer add …`, `status`)
set -eu

DATA="${SYNCNODE_DATA:-/data}"
export SYNCNODE_DATA="$DATA"

if [ "$#" -eq 0 ]; then
  set -- run
fi

case "$1" in
  healthcheck)
    port="${SYNCNODE_API_PORT:-8080}"
    exec python3 -c '
import sys, urllib.request
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/healthz", timeout=5) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception as exc:
    print(f"healthz: {exc}", file=sys.stderr)
    sys.exit(1)
' "$port"
    ;;
  run)
    shift
    if [ ! -f "$DATA/node.crt" ]; then
      syncnode init --data "$DATA"
    fi
    exec syncnode run --data "$DATA" "$@"
    ;;
  *)
    exec syncnode "$@"
    ;;
esac
