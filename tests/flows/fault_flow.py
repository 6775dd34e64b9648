"""The fault matrix's flow: one billable step (start), one escrow, faults chosen by the test.

``@fault_point`` sits between ``@pf_escrow_step`` and ``@step``, so Metaflow runs its hooks
first: its ``task_post_step`` runs after the body and before ``@pf_escrow_step`` releases.
``@catch`` and ``@timeout`` come from ``run --with ...`` when a cell wants them.
"""

import time

from fault_points import at, fault_point
from metaflow import FlowSpec, step

from pf_metaflow import pf_escrow_step


class FaultFlow(FlowSpec):
    @pf_escrow_step(agent_wallet="ag_sandbox_worker", amount_usdc="1.25", label="work")
    @fault_point
    @step
    def start(self):
        at("body_start")
        self.progress = "half way"
        time.sleep(0.2)
        at("mid_body")
        self.progress = "done"
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    FaultFlow()
