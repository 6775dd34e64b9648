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

pf-metaflow sandbox serve --port "$port" &
server=$!
trap 'kill "$server"' EXIT

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
