"""Pays for start, then fails in work while the file `broken` exists: run, fix, resume."""

import os

from metaflow import FlowSpec, step

from pf_metaflow import pf_escrow_step


class ResumeFlow(FlowSpec):
    @pf_escrow_step(agent_wallet="ag_sandbox_worker", amount_usdc="0.75")
    @step
    def start(self):
        self.next(self.work)

    @pf_escrow_step(agent_wallet="ag_sandbox_worker", amount_usdc="1.50")
    @step
    def work(self):
        if os.path.exists("broken"):
            raise RuntimeError("input is broken")
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    ResumeFlow()
