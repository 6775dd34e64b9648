"""Budgeted payments: weights split a total over steps, a foreach splits its step's budget per shard."""

from metaflow import FlowSpec, JSONType, Parameter, step

from pf_metaflow import allot_shards, pf_escrow_step, plan_budget


class BudgetFlow(FlowSpec):
    total_budget_usdc = Parameter("total_budget_usdc", default="3.00")
    step_weights = Parameter("step_weights", type=JSONType, default='{"prep": 0.5, "shard": 0.5}')
    num_shards = Parameter("num_shards", default=3, type=int)
    agent_wallet = Parameter("agent_wallet", default="ag_sandbox_worker")

    @step
    def start(self):
        # Validate and split everything before the first escrow exists.
        self.shards = list(range(self.num_shards))
        budget = plan_budget(self.total_budget_usdc, self.step_weights, flow=self)
        self.pf_budget = allot_shards(budget, "shard", len(self.shards))
        self.next(self.prep)

    @pf_escrow_step
    @step
    def prep(self):
        self.next(self.shard, foreach="shards")

    @pf_escrow_step(agent_wallet="agent_wallet")
    @step
    def shard(self):
        self.next(self.join)

    @step
    def join(self, inputs):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    BudgetFlow()
