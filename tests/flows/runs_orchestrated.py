"""A paid start and a paid foreach, for driving step by step the way orchestrators do.

``kill_item`` makes that shard's task SIGKILL itself after its escrow is locked;
``sleep_item`` makes it wait after locking (a task still running): until ``hold_file`` exists,
for at most ``sleep_seconds``, so a test releases it the moment it has seen what it needs.
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
    hold_file = Parameter("hold_file", default="")

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
            deadline = time.monotonic() + self.sleep_seconds
            while time.monotonic() < deadline and not (self.hold_file and os.path.exists(self.hold_file)):
                time.sleep(0.05)
        self.next(self.join)

    @step
    def join(self, inputs):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    RunsOrchestratedFlow()
