"""Issue 9, case 1: a step whose body succeeds but leaves an artifact Metaflow cannot pickle.

Attempt 0 pays (the release happens in task_post_step), then Metaflow fails the task
while persisting its artifacts, and @retry runs the body again. ``--every_attempt`` makes
every attempt leave the lock (the task finally fails); otherwise only attempt 0 does.
"""

import threading

from metaflow import FlowSpec, Parameter, current, retry, step

from pf_metaflow import pf_escrow_step


class CasePaidTwiceFlow(FlowSpec):
    every_attempt = Parameter("every_attempt", default=False, type=bool)

    @step
    def start(self):
        self.next(self.work)

    @retry(times=1, minutes_between_retries=0)
    @pf_escrow_step(agent_wallet="ag_sandbox_worker", amount_usdc="1.00")
    @step
    def work(self):
        print(f"body of attempt {current.retry_count} ran")
        self.result = "done"
        if self.every_attempt or current.retry_count == 0:
            self.lock = threading.Lock()  # cannot be pickled: persisting the task fails
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    CasePaidTwiceFlow()
