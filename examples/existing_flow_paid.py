"""`existing_flow.py` after adding `@pf_escrow_step`: the summary is now paid work.

    python examples/existing_flow_paid.py run
    diff examples/existing_flow.py examples/existing_flow_paid.py

The changes: one import, an `agent_wallet` Parameter (the built-in sandbox worker
by default, required on the live service), and the decorator above `@step`. The
escrow (0.50 USDC) is locked before `summarize` runs, released when it succeeds,
refunded if it raises.
"""

import random
import statistics

from metaflow import FlowSpec, Parameter, step

from pf_metaflow import pf_escrow_step, sandbox_or_required_agent


class ReportFlow(FlowSpec):
    """Draw a sample, summarise it, print the report."""

    size = Parameter("size", default=1000, type=int, help="How many numbers to summarise.")
    agent_wallet = Parameter("agent_wallet", default=sandbox_or_required_agent, show_default=False,
                             help="Agent paid (ag_…); default on the sandbox: ag_sandbox_worker.")

    @step
    def start(self):
        rng = random.Random(42)
        self.sample = [rng.gauss(100, 15) for _ in range(self.size)]
        self.next(self.summarize)

    @pf_escrow_step(agent_wallet="agent_wallet", amount_usdc="0.50")
    @step
    def summarize(self):
        self.report = {
            "n": len(self.sample),
            "mean": round(statistics.fmean(self.sample), 3),
            "stdev": round(statistics.stdev(self.sample), 3),
            "p95": round(statistics.quantiles(self.sample, n=20)[-1], 3),
        }
        self.next(self.end)

    @step
    def end(self):
        print("report:", self.report)


if __name__ == "__main__":
    ReportFlow()
