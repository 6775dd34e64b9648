#!/bin/sh
# Run a flow against a sandbox escrow *server*: the live service's HTTP protocol
# on 127.0.0.1 (plus a refund call and idempotency keys), with test money. The
# flow code is unchanged: PF_ESCROW_URL and PF_API_KEY choose where escrow lives.
#
#   sh examples/sandbox_server.sh
#
# To rehearse the live service's rules (no refund call: a failed step's escrow
# becomes `refund_pending`, returned by itself after its timeout less 1%; no
# idempotency keys), start the server with `--no-refund --no-idempotency`.
set -eu
here=$(dirname "$0")
port=${PORT:-8765}

# Refuse a port something else holds: the flows would talk to whatever server that is.
if python -c "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)" "$port" 2>/dev/null; then
    echo "sandbox_server.sh: port $port is taken by another process; choose a free one: PORT=8766 sh $0" >&2
    exit 2
fi

pf-metaflow sandbox serve --port "$port" &
server=$!
# Stop the server on the way out, and keep this script's own exit status.
trap 'status=$?; kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; exit $status' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

python - "$port" <<'PY'
import sys, time, urllib.request
for _ in range(100):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=1)
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit("the sandbox server did not start")
PY
kill -0 "$server" 2>/dev/null || { echo "sandbox_server.sh: the sandbox server exited" >&2; exit 1; }

# Plain http is allowed to loopback only; the key is the built-in payer's
# sandbox key (not a secret: it moves local test money). Register your own
# agents with `pf-metaflow sandbox register NAME` and fund them with
# `pf-metaflow sandbox faucet AGENT`.
export PF_ESCROW_URL="http://127.0.0.1:$port"
export PF_API_KEY=pf_sandbox_payer_key

python "$here/../flows/training_bounty.py" run                  # paid
python "$here/../flows/training_bounty.py" run --fail_at train  # refunded

pf-metaflow ledger TrainingBountyFlow
pf-metaflow sandbox balance
