"""A flow whose one billable step can succeed, fail, miss its gate, time out or be killed."""

import os
import signal
import time

from metaflow import FlowSpec, Parameter, catch, step, timeout

from pf_metaflow import pf_escrow_step


class PayFlow(FlowSpec):
    mode = Parameter("mode", default="ok", help="ok | fail | timeout | kill")
    score = Parameter("score", default=0.9, type=float)
    min_score = Parameter("min_score", default=0.8, type=float)

    @step
    def start(self):
        self.next(self.work)

    @catch(var="work_error", print_exception=False)
    @timeout(seconds=3)
    @pf_escrow_step(agent_wallet="ag_sandbox_worker", amount_usdc="2.50", label="work",
                    release_if="accuracy >= min_score")
    @step
    def work(self):
        if self.mode == "fail":
            raise ValueError("the work went wrong")
        if self.mode == "timeout":
            time.sleep(30)
        if self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        self.accuracy = self.score
        self.next(self.end)

    @step
    def end(self):
        self.caught = repr(self.work_error) if self.work_error else None


if __name__ == "__main__":
    PayFlow()
