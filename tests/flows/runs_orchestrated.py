"""A paid start and a paid foreach, for driving step by step the way orchestrators do.

``kill_item`` makes that shard's task SIGKILL itself after its escrow is locked;
``sleep_item`` makes it sleep ``sleep_seconds`` after locking (a task still running).
"""

import os
import signal
import time

from metaflow import FlowSpec, Parameter, step

from pf_metaflow import pf_escrow_step


class RunsOrchestratedFlow(FlowSpec):
    kill_item = Parameter("kill_item", default=-1, type=int)
    sleep_item = Parameter("sleep_item", default=-1, type=int)
    sleep_seconds = Parameter("sleep_seconds", default=0.0, type=float)

    @pf_escrow_step(agent_wallet="ag_sandbox_worker", amount_usdc="0.25", label="plan")
    @step
    def start(self):
        self.items = [0, 1, 2]
        self.next(self.work, foreach="items")

    @pf_escrow_step(agent_wallet="ag_sandbox_worker", amount_usdc="1.00", label="shard")
    @step
    def work(self):
        if self.input == self.kill_item:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.input == self.sleep_item:
            time.sleep(self.sleep_seconds)
        self.next(self.join)

    @step
    def join(self, inputs):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    RunsOrchestratedFlow()
