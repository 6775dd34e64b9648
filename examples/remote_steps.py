"""Pay for work that runs remotely (Kubernetes, AWS Batch) without the key in code.

The escrow is locked and settled inside the task, so the remote container needs
``PF_ESCROW_URL`` and ``PF_API_KEY`` in its environment:

- ``PF_ESCROW_URL`` is not a secret: ``@environment`` forwards the value set where
  you launch the run.
- ``PF_API_KEY`` comes from your secrets manager through ``@secrets``: create a
  secret (here named ``purpleflea-escrow``) holding ``{"PF_API_KEY": "pf_live_…"}``
  in the backend Metaflow is configured for (``METAFLOW_DEFAULT_SECRETS_BACKEND_TYPE``,
  e.g. AWS Secrets Manager). On Kubernetes a cluster secret works too:
  ``@kubernetes(secrets=["purpleflea-escrow"])`` turns its keys into variables.

Decorator order does not matter: ``@pf_escrow_step`` locks the escrow only after
every decorator of the step has prepared the task, so the key from ``@secrets``
is already in the environment.

    export PF_ESCROW_URL=https://escrow.purpleflea.com
    python examples/remote_steps.py run --agent_wallet ag_… --with kubernetes
    python examples/remote_steps.py run --agent_wallet ag_… --with batch

The key is never passed as a Parameter or put in an ``@environment`` value:
both are stored with the run (and ``@environment`` values land in the job spec)
for anyone who can read it. Without ``PF_ESCROW_URL`` each remote container would
use its own embedded sandbox, so the run is refused before any task starts (as it is
with local metadata: use ``--metadata service``); see docs/deploy.md, also for deploying
to Argo Workflows with the key in a Kubernetes secret (``examples/deploy_argo.sh``).
"""

import os

from metaflow import FlowSpec, Parameter, environment, secrets, step

from pf_metaflow import pf_escrow_step, sandbox_or_required_agent

ESCROW_ENV = {name: os.environ[name] for name in ("PF_ESCROW_URL", "PF_REFERRAL_CODE") if name in os.environ}


class RemotePaidFlow(FlowSpec):
    """One paid step, run wherever `--with kubernetes` or `--with batch` sends it."""

    agent_wallet = Parameter("agent_wallet", default=sandbox_or_required_agent, show_default=False,
                             help="Agent paid (ag_…); required on the live service.")

    @step
    def start(self):
        self.next(self.work)

    @pf_escrow_step(agent_wallet="agent_wallet", amount_usdc="2.00")
    @secrets(sources=["purpleflea-escrow"])
    @environment(vars=ESCROW_ENV)
    @step
    def work(self):
        self.result = sum(i * i for i in range(1_000_000))
        self.next(self.end)

    @step
    def end(self):
        print("paid:", self.pf_escrows)


if __name__ == "__main__":
    RemotePaidFlow()
