#!/bin/sh
# Pay for a step of a flow you don't want to (or can't) edit: `--with` adds the
# decorator at run time. Installing pf-metaflow is enough for Metaflow to know
# `pf_escrow_step`; the flow itself never imports it.
#
#   sh examples/paid_with_with.sh
#
# `--with` puts the decorator on every step, so `steps=` says which are billed
# (several: steps=train+evaluate). The flow has no agent_wallet Parameter, so the
# agent is named here; on the live service use your agent's id (ag_…).
set -eu
here=$(dirname "$0")

python "$here/existing_flow.py" run \
    --with 'pf_escrow_step:agent_wallet=ag_sandbox_worker,amount_usdc=0.50,steps=summarize'

# What the run paid:
pf-metaflow ledger ReportFlow
