"""Issue 9, item 7: a 2.00 USDC budget, and a second paid step naming the first's budget_key.

``first`` has 1.50 of the budget; ``second`` draws on the same key, so the run would lock
3.00 of its 2.00. The flow must be refused when Metaflow checks it, before any escrow.
"""

from metaflow import FlowSpec, step

from pf_metaflow import pf_escrow_step, plan_budget


class CaseBudgetSharedKeyFlow(FlowSpec):
    @step
    def start(self):
        self.pf_budget = plan_budget("2.00", {"first": 0.75, "second": 0.25}, flow=self)
        self.next(self.first)

    @pf_escrow_step(agent_wallet="ag_sandbox_worker")
    @step
    def first(self):
        self.next(self.second)

    @pf_escrow_step(agent_wallet="ag_sandbox_worker", budget_key="first")
    @step
    def second(self):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    CaseBudgetSharedKeyFlow()
