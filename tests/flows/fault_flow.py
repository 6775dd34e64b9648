"""The fault matrix's flow: one billable step (start), one escrow, faults chosen by the test.

``@fault_point`` sits between ``@pf_escrow_step`` and ``@step``, so Metaflow runs its hooks
first: its ``task_post_step`` runs after the body and before ``@pf_escrow_step`` releases.
``@catch``, ``@timeout`` and ``@retry`` come from ``run --with ...`` when a cell wants them.
The body waits at the test's gate when ``PFMF_GATE`` is set, and can leave an artifact that
fails (or kills) the task while Metaflow persists it, after the release (see ``fault_points``).
The same flow runs under ``run`` and step by step, as an orchestrator drives it.
"""

import time

from fault_points import at, fault_point, gate
from metaflow import FlowSpec, step

from pf_metaflow import pf_escrow_step


class FaultFlow(FlowSpec):
    @pf_escrow_step(agent_wallet="ag_sandbox_worker", amount_usdc="1.25", label="work")
    @fault_point
    @step
    def start(self):
        at("body_start")
        gate()
        self.progress = "half way"
        time.sleep(0.2)
        at("mid_body")
        self.progress = "done"
        at("persist", self)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    FaultFlow()
