"""Batch scoring paid per shard: a failed shard refunds only itself.

The payment story
-----------------
1. ``start`` runs ``preflight`` (the escrow service, the payee) and plans the
   budget: all of ``total_budget_usdc`` goes to the ``score`` step, split into
   one exact allowance per shard *before* the fan-out (``allot_shards``; the
   allowances add up to the step's budget to the last micro-USDC, so the run can never lock more than it was given).
2. ``score`` runs once per shard (``foreach``). Each shard's task locks its own
   allowance in escrow for ``agent_wallet`` (``@pf_escrow_step`` with no amount
   takes it from the budget), scores its rows, and is paid the moment it
   finishes. A shard that raises is refunded, and ``@catch`` keeps the other
   shards' work and payments: partial failure costs nothing for the failed part.
3. ``join`` receives every shard's ledger entry (``@pf_escrow_step`` merges the
   inputs' ledgers into ``self.pf_ledger`` before a join runs), combines the
   results of the shards that succeeded and reports which shards were paid and
   which refunded.
4. ``end`` prints what was paid, refunded and left pending, ends with a ``RESULT:``
   line, and shows the ledger as a card (``python flows/batch_shards.py card view end``).
   A shard whose escrow could not be created (the service refused the create, or its
   rate limit stayed full past ``PF_ESCROW_MAX_WAIT``) did not run and was not paid: it is
   in the ledger as ``not_created`` with the reason, ``join`` and ``end`` name it
   (``UNPAID score[3]: …``, a ``WARNING`` line, ``RESULT: UNPAID: …``), and ``end`` then
   fails, so the run exits non-zero and is not ``successful``: re-run those shards.

Run it
------
    python flows/batch_shards.py run                                      # 8 shards, all paid
    python flows/batch_shards.py run --num_shards 20 --fail_shards 3,7    # 18 paid, 2 refunded

    # 24 shards against a live-like service allowing 5 creates per 6 s: all paid, paced
    pf-metaflow sandbox serve --live --create-rate 5/6 --port 8765 &
    PF_ESCROW_URL=http://127.0.0.1:8765 PF_API_KEY=pf_sandbox_payer_key \
        python flows/batch_shards.py run --num_shards 24 --max-workers 24
"""

from decimal import Decimal

from metaflow import FlowSpec, Parameter, card, catch, current, step

from pf_metaflow import format_table, pf_escrow_step, sandbox_or_required_agent
from pf_metaflow.card import append_ledger_card, end_summary, fail_if_unpaid, ordered
from pf_metaflow.params import USDC
from pf_metaflow.preflight import PreflightError, preflight
from workloads import InjectedFailure, make_transactions, parse_shard_list, score_shard


def shard_of(entry: dict) -> int:
    """The foreach index of a ledger entry (its ``shard`` is ``score[3]``)."""
    return int(entry["shard"].rsplit("[", 1)[1].rstrip("]"))


class BatchShardsFlow(FlowSpec):
    """Score N shards in parallel, one escrow per shard, paid or refunded shard by shard."""

    agent_wallet = Parameter(
        # show_default=False: `run --help` must not evaluate the default, which refuses
        # to pick a payee when PF_ESCROW_URL points at the live service.
        "agent_wallet", default=sandbox_or_required_agent, show_default=False,
        help="Purple Flea agent id (ag_…) paid per shard. Default on the sandbox: "
             "its built-in worker; required on the live service.",
    )
    total_budget_usdc = Parameter("total_budget_usdc", type=USDC, default="5.00",
                                  help="USDC for the whole batch, split evenly over the shards.")
    num_shards = Parameter("num_shards", default=8, type=int, help="How many shards to fan out over.")
    rows_per_shard = Parameter("rows_per_shard", default=250, type=int, help="Rows scored per shard.")
    fail_shards = Parameter("fail_shards", default="",
                            help="Inject failures: comma-separated shard indices (0-based) that raise.")
    seed = Parameter("seed", default=7, type=int, help="Seed of the synthetic transactions.")

    @step
    def start(self):
        """Preflight, plan the budget and split the score step's share over the shards, before fanning out."""
        if self.num_shards < 1 or self.rows_per_shard < 1:
            raise PreflightError("--num_shards and --rows_per_shard must be at least 1")
        try:
            self.failing = parse_shard_list(self.fail_shards, self.num_shards)
        except ValueError as exc:
            raise PreflightError(str(exc)) from None
        self.pf_budget = preflight(self, total_budget_usdc=self.total_budget_usdc,
                                   step_weights={"score": 1}, shards={"score": self.num_shards})
        allowances = [Decimal(a) for a in self.pf_budget["shards"]["score"]]
        print(f"Budget {self.pf_budget['total_usdc']} USDC over {self.num_shards} shards: "
              f"{min(allowances)}-{max(allowances)} USDC each, to {self.agent_wallet}")
        self.shards = list(range(self.num_shards))
        self.next(self.score, foreach="shards")

    @catch(var="score_error", print_exception=False)
    @pf_escrow_step(agent_wallet="agent_wallet")
    @step
    def score(self):
        """One shard's work: score its rows with the risk model."""
        self.shard = self.input
        if self.shard in self.failing:
            raise InjectedFailure(f"failure injected in shard {self.shard} (--fail_shards)")
        self.result = score_shard(make_transactions(self.shard, self.rows_per_shard, self.seed))
        self.next(self.join)

    @step
    def join(self, inputs):
        """Combine the scored shards; report, from the merged ledger, who was paid."""
        shards = list(inputs)
        done = [inp.result for inp in shards if inp.score_error is None]
        self.rows_scored = sum(r["rows"] for r in done)
        self.flagged = sorted(tx for r in done for tx in r["flagged"])
        entries = [e for e in self.pf_ledger if e["step"] == "score"]
        self.paid_shards = sorted(shard_of(e) for e in entries if e["status"] == "released")
        self.refunded_shards = sorted(shard_of(e) for e in entries if e["status"] == "refunded")
        # No escrow could be created for these (refused, or the rate limit's wait ran out):
        # they did not run and nobody was paid for them.
        self.unpaid_shards = sorted(shard_of(e) for e in entries if e["status"] == "not_created")
        print(f"{len(done)} of {len(shards)} shards scored: {self.rows_scored} rows, "
              f"{len(self.flagged)} flagged")
        print(f"paid shards ({len(self.paid_shards)}): {', '.join(map(str, self.paid_shards)) or 'none'}")
        print(f"refunded shards ({len(self.refunded_shards)}): "
              f"{', '.join(map(str, self.refunded_shards)) or 'none'}")
        print(f"unpaid shards, no escrow created ({len(self.unpaid_shards)}): "
              f"{', '.join(map(str, self.unpaid_shards)) or 'none'}")
        self.next(self.end)

    @card
    @step
    def end(self):
        """What was paid, refunded and left pending, shard by shard; the last line says how the batch ended."""
        print(format_table(ordered(self.pf_ledger), title="Batch payments, one escrow per shard"))
        outcome = (f"Batch: {len(self.paid_shards)} of {self.num_shards} shards scored and paid"
                   + (f"; refunded: {', '.join(map(str, self.refunded_shards))}" if self.refunded_shards else "")
                   + (f"; unpaid (no escrow created): {', '.join(map(str, self.unpaid_shards))}"
                      if self.unpaid_shards else ""))
        self.summary = end_summary(self.pf_ledger, outcome=outcome)
        print(self.summary)
        append_ledger_card(current.card, self.pf_ledger, summary=self.summary)
        fail_if_unpaid(self.pf_ledger)  # unpaid work: the run exits non-zero, not successful


if __name__ == "__main__":
    BatchShardsFlow()
