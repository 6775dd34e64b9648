"""The escrow settings arrive through @secrets, written *above* @pf_escrow_step."""

import os

from metaflow import FlowSpec, secrets, step

from pf_metaflow import pf_escrow_step

SECRET_DB = os.environ["SECRET_DB"]  # where the secret says the escrow lives
SECRET = {"type": "inline", "id": "pf", "options": {"env_vars": {"PF_ESCROW_URL": "sandbox://" + SECRET_DB}}}


class SecretsFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.work)

    @secrets(sources=[SECRET])
    @pf_escrow_step(agent_wallet="ag_sandbox_worker", amount_usdc="1.00")
    @step
    def work(self):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    SecretsFlow()
