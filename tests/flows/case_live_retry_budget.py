"""Issue 9, case 2 with a per-step budget: ``work`` locks its whole budget (plan_budget in
``start``), fails twice, then succeeds under @retry(times=2). A retry must not wait on its
own earlier attempt's escrow (it adopts it), so no BudgetError."""

from metaflow import FlowSpec, Parameter, current, retry, step

from pf_metaflow import pf_escrow_step, plan_budget


class CaseLiveRetryBudgetFlow(FlowSpec):
    total_budget_usdc = Parameter("total_budget_usdc", default="2.00")

    @step
    def start(self):
        self.pf_budget = plan_budget(self.total_budget_usdc, {"work": 1.0}, flow=self)
        self.next(self.work)

    @retry(times=2, minutes_between_retries=0)
    @pf_escrow_step(agent_wallet="ag_sandbox_worker")
    @step
    def work(self):
        if current.retry_count < 2:
            raise RuntimeError(f"flaky attempt {current.retry_count}")
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    CaseLiveRetryBudgetFlow()
