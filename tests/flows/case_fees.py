"""Issue 9, case 5: paid steps that finally fail, on a server without a refund call.

Each escrow is left to the service's timeout, which gives it back less the 1% commission:
the ledger records ``refund_pending`` with the fee the server says it keeps.
"""

from metaflow import FlowSpec, catch, step

from pf_metaflow import pf_escrow_step


class CaseFeesFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.whole)

    @catch(var="whole_error", print_exception=False)
    @pf_escrow_step(agent_wallet="ag_sandbox_worker", amount_usdc="1.00")
    @step
    def whole(self):
        raise RuntimeError("the work went wrong")
        self.next(self.odd)

    @catch(var="odd_error", print_exception=False)
    @pf_escrow_step(agent_wallet="ag_sandbox_worker", amount_usdc="0.3001")
    @step
    def odd(self):
        raise RuntimeError("the work went wrong")
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    CaseFeesFlow()
