#!/usr/bin/env bash
# Deploy a paid flow to Argo Workflows with the key in a Kubernetes secret (docs/deploy.md).
#
# Needs: a cluster with Argo Workflows, Metaflow configured for it (metadata service, S3
# datastore, `pip install kubernetes`), and PF_API_KEY in your shell. The key goes from your
# shell into the cluster secret; the compiled workflow names the secret, never the key.
set -euo pipefail
: "${PF_API_KEY:?set PF_API_KEY (pf_live_…) in your shell first}"
: "${AGENT:?set AGENT to the Purple Flea agent id (ag_…) paid for the work}"
FLOW=${FLOW:-flows/ml_pipeline_with_payments.py}

# 1. The secret, once per namespace: every pod gets PF_API_KEY and PF_ESCROW_URL from it.
kubectl create secret generic purpleflea-escrow \
    --from-literal=PF_API_KEY="$PF_API_KEY" \
    --from-literal=PF_ESCROW_URL=https://escrow.purpleflea.com \
    --dry-run=client -o yaml | kubectl apply -f -

# 2. Compile and deploy: every step's pod mounts the secret (envFrom/secretRef). No key and
#    no payee are baked in (agent_wallet's default is empty in a deployment).
export METAFLOW_KUBERNETES_SECRETS=purpleflea-escrow
python "$FLOW" --datastore s3 --metadata service argo-workflows create

# To see what was compiled, without deploying:
#   python "$FLOW" --datastore s3 --metadata service argo-workflows create --only-json | grep -c pf_live_   # 0

# 3. Trigger, naming the agent paid (left out, the run stops in `start`, before any money moves).
python "$FLOW" --datastore s3 --metadata service argo-workflows trigger --agent_wallet "$AGENT"

# 4. After it ran: the ledger, read through the metadata service.
#   pf-metaflow ledger MLPipelineWithPayments/argo-…
#   pf-metaflow reconcile MLPipelineWithPayments/argo-…     # if a pod was killed with its escrow locked
