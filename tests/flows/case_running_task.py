"""Issue 9, case 3: a paid step still running while someone reconciles its run.

``work`` locks 1.00 USDC, writes ``<gate>.started`` and waits (at most ``max_wait``
seconds) until the test creates the file ``gate``; then it succeeds and is paid. The
test adds ``@catch`` with ``--with catch:var=work_error`` where it wants one.
"""

import os
import time

from metaflow import FlowSpec, Parameter, step

from pf_metaflow import pf_escrow_step


class CaseRunningTaskFlow(FlowSpec):
    gate = Parameter("gate", help="the step waits until this file exists")
    max_wait = Parameter("max_wait", default=60.0, type=float)

    @step
    def start(self):
        self.next(self.work)

    @pf_escrow_step(agent_wallet="ag_sandbox_worker", amount_usdc="1.00")
    @step
    def work(self):
        with open(self.gate + ".started", "w") as f:
            f.write(str(os.getpid()))
        deadline = time.monotonic() + self.max_wait
        while not os.path.exists(self.gate):
            if time.monotonic() > deadline:
                raise RuntimeError(f"nobody opened the gate {self.gate} within {self.max_wait} s")
            time.sleep(0.05)
        self.body_finished = True
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    CaseRunningTaskFlow()
