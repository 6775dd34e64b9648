"""A billable step killed with SIGKILL right after its escrow is locked (no @retry, no @catch)."""

import os
import signal

from metaflow import FlowSpec, step

from pf_metaflow import pf_escrow_step


class KillFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.work)

    @pf_escrow_step(agent_wallet="ag_sandbox_worker", amount_usdc="2.50")
    @step
    def work(self):
        os.kill(os.getpid(), signal.SIGKILL)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    KillFlow()
