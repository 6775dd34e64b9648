"""An existing flow with no payments in it: it summarises some numbers.

    python examples/existing_flow.py run

`existing_flow_paid.py` is the same flow after adding `@pf_escrow_step` (an
import, a Parameter and the decorator), and `paid_with_with.sh` pays for it
without editing it.
"""

import random
import statistics

from metaflow import FlowSpec, Parameter, step


class ReportFlow(FlowSpec):
    """Draw a sample, summarise it, print the report."""

    size = Parameter("size", default=1000, type=int, help="How many numbers to summarise.")

    @step
    def start(self):
        rng = random.Random(42)
        self.sample = [rng.gauss(100, 15) for _ in range(self.size)]
        self.next(self.summarize)

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
