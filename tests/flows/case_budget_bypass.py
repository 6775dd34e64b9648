"""Issue 9, item 7: explicit amounts cannot pay on top of a run's budget.

The run plans 2.00 USDC: ``planned`` 1.00 (paid from the budget) and ``shard`` 1.00, not
split per shard. ``extra`` has no share but an explicit amount_usdc; each ``shard`` of the
foreach has an explicit amount_usdc although its step's budget was never split. Both are
refused before any escrow is created (``@catch`` records why) and their bodies never run.
"""

from metaflow import FlowSpec, catch, step

from pf_metaflow import pf_escrow_step, plan_budget


class CaseBudgetBypassFlow(FlowSpec):
    @step
    def start(self):
        self.pf_budget = plan_budget("2.00", {"planned": 0.5, "shard": 0.5}, flow=self)
        self.next(self.planned)

    @pf_escrow_step(agent_wallet="ag_sandbox_worker")
    @step
    def planned(self):
        self.next(self.extra)

    @catch(var="extra_error", print_exception=False)
    @pf_escrow_step(agent_wallet="ag_sandbox_worker", amount_usdc="0.50")
    @step
    def extra(self):
        self.extra_ran = True
        self.next(self.fan)

    @step
    def fan(self):
        self.items = [0, 1]
        self.next(self.shard, foreach="items")

    @catch(var="shard_error", print_exception=False)
    @pf_escrow_step(agent_wallet="ag_sandbox_worker", amount_usdc="0.20")
    @step
    def shard(self):
        self.shard_ran = True
        self.next(self.join)

    @step
    def join(self, inputs):
        self.shard_errors = [str(i.shard_error) for i in inputs]
        self.shards_ran = [getattr(i, "shard_ran", False) for i in inputs]
        self.merge_artifacts(inputs, exclude=["shard_error", "shard_ran"])
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    CaseBudgetBypassFlow()
