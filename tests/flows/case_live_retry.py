"""Issue 9, case 2: a paid step (1.25 USDC) that fails twice, then succeeds, under @retry(times=2)."""

from metaflow import FlowSpec, current, retry, step

from pf_metaflow import pf_escrow_step


class CaseLiveRetryFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.work)

    @retry(times=2, minutes_between_retries=0)
    @pf_escrow_step(agent_wallet="ag_sandbox_worker", amount_usdc="1.25")
    @step
    def work(self):
        if current.retry_count < 2:
            raise RuntimeError(f"flaky attempt {current.retry_count}")
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    CaseLiveRetryFlow()
