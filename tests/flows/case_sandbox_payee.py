"""Issue 9, item 11: a flow whose payee defaults to the sandbox's built-in worker.

Pointed at a service that is not a sandbox, ``work`` must be refused before anything is
created (an ``ag_sandbox_*`` agent is test money only).
"""

from metaflow import FlowSpec, Parameter, step

from pf_metaflow import pf_escrow_step


class CaseSandboxPayeeFlow(FlowSpec):
    agent_wallet = Parameter("agent_wallet", default="ag_sandbox_worker")

    @step
    def start(self):
        self.next(self.work)

    @pf_escrow_step(amount_usdc="1.00")
    @step
    def work(self):
        self.work_ran = True
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    CaseSandboxPayeeFlow()
