"""A paid step that takes a while: something to kill, for `reconcile_after_kill.py`.

    python examples/long_job.py run --seconds 60
"""

import time

from metaflow import FlowSpec, Parameter, step

from pf_metaflow import pf_escrow_step, sandbox_or_required_agent


class LongJobFlow(FlowSpec):
    """One billable step that works for `--seconds`."""

    agent_wallet = Parameter("agent_wallet", default=sandbox_or_required_agent, show_default=False,
                             help="Agent paid (ag_…); required on the live service.")
    seconds = Parameter("seconds", default=60, type=int, help="How long the paid step works.")

    @step
    def start(self):
        self.next(self.work)

    @pf_escrow_step(agent_wallet="agent_wallet", amount_usdc="4.00")
    @step
    def work(self):
        for _ in range(self.seconds):
            time.sleep(1)
        self.next(self.end)

    @step
    def end(self):
        print("paid:", self.pf_escrows)


if __name__ == "__main__":
    LongJobFlow()
