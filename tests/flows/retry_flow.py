"""A billable step that fails (or is killed) on its first two attempts, then succeeds."""

import os
import signal

from metaflow import FlowSpec, Parameter, current, retry, step

from pf_metaflow import pf_escrow_step


class RetryFlow(FlowSpec):
    kill = Parameter("kill", default=False, type=bool, help="SIGKILL the failing attempts")

    @step
    def start(self):
        self.next(self.work)

    @retry(times=2, minutes_between_retries=0)
    @pf_escrow_step(agent_wallet="ag_sandbox_worker", amount_usdc=1.25)
    @step
    def work(self):
        if current.retry_count < 2:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"flaky attempt {current.retry_count}")
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    RetryFlow()
