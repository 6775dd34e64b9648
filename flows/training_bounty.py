"""A training bounty: an agent is paid to train a model, and only if it is good enough.

The payment story
-----------------
1. ``start`` checks the terms (the accuracy bar) and runs ``preflight`` (the
   escrow service, who is paid, how much) before any money moves: a setup
   mistake stops the run there with one line.
2. ``train`` is the agent's job. Before its body runs, ``@pf_escrow_step`` locks
   ``step_budget`` USDC in escrow for ``agent_wallet``. The step fits a
   logistic regression on a seeded synthetic dataset and measures its accuracy
   on a held-out split.
3. When ``train`` ends, the escrow is settled:

   - training succeeded and ``accuracy >= min_accuracy``: **released**, the agent
     receives the amount less Purple Flea's 1% fee;
   - accuracy below the bar: **refunded**, with the measured accuracy as the reason;
   - training raised: **refunded**, and ``@catch`` records the error so the run
     goes on.
4. ``evaluate`` reads the outcome from the run's ledger (``self.pf_ledger``) and
   states the verdict; ``end`` prints what was paid, refunded and charged in fees.

Why the escrow is settled in ``train`` and not in ``evaluate``: the escrow id is
written to ``train``'s task metadata before the body runs and the release gate is
checked the moment the body returns, so whatever happens to the run afterwards
(a crash in ``evaluate``, a killed process) the bounty is already settled, or
``pf-metaflow reconcile`` can settle it from that record. Funds are also locked
only while the agent is actually working.

Run it
------
    python flows/training_bounty.py run                        # paid: accuracy ~0.93
    python flows/training_bounty.py run --min_accuracy 0.99    # refunded: bar not met
    python flows/training_bounty.py run --fail_at train        # refunded: training failed

On the live service (``PF_ESCROW_URL`` and ``PF_API_KEY`` set) ``--agent_wallet
ag_…`` is required; on the sandbox it defaults to the built-in worker.
"""

from metaflow import FlowSpec, Parameter, card, catch, current, step

from pf_metaflow import format_table, pf_escrow_step, sandbox_or_required_agent
from pf_metaflow.card import append_ledger_card, end_summary
from pf_metaflow.params import USDC
from pf_metaflow.preflight import PreflightError, preflight
from workloads import accuracy, fail_if_asked, fit_logistic, make_blobs, parse_fail_at, split


class TrainingBountyFlow(FlowSpec):
    """Pay an agent to train a model; release only if held-out accuracy meets the bar."""

    agent_wallet = Parameter(
        # show_default=False: `run --help` must not evaluate the default, which refuses
        # to pick a payee when PF_ESCROW_URL points at the live service.
        "agent_wallet", default=sandbox_or_required_agent, show_default=False,
        help="Purple Flea agent id (ag_…) paid for training. Default on the sandbox: "
             "its built-in worker; required on the live service.",
    )
    step_budget = Parameter("step_budget", type=USDC, default="3.00", help="USDC locked for the training bounty.")
    min_accuracy = Parameter(
        "min_accuracy", default=0.85, type=float,
        help="Held-out accuracy the model must reach for the agent to be paid.",
    )
    seed = Parameter("seed", default=7, type=int, help="Seed of the synthetic dataset.")
    fail_at = Parameter("fail_at", default="", help="Inject a failure: 'train' raises inside training.")

    @step
    def start(self):
        """Check the setup and the terms before any escrow exists."""
        try:
            parse_fail_at(self.fail_at, ["train"])
        except ValueError as exc:
            raise PreflightError(str(exc)) from None
        if not 0.0 <= self.min_accuracy <= 1.0:
            raise PreflightError(f"--min_accuracy must be between 0 and 1, got {self.min_accuracy:g}")
        preflight(self)
        print(f"Bounty: {self.step_budget} USDC to {self.agent_wallet} "
              f"if held-out accuracy >= {self.min_accuracy}")
        self.next(self.train)

    @catch(var="train_error", print_exception=False)
    @pf_escrow_step(agent_wallet="agent_wallet", amount_usdc="step_budget",
                    release_if="accuracy >= min_accuracy")
    @step
    def train(self):
        """The agent's job: fit a classifier and measure it on data it never saw."""
        fail_if_asked("train", parse_fail_at(self.fail_at, ["train"]))
        train_set, holdout = split(make_blobs(600, self.seed))
        model = fit_logistic(train_set)
        self.model = model.to_dict()
        self.accuracy = accuracy(model, holdout)
        print(f"held-out accuracy {self.accuracy:.4f} on {len(holdout)} rows")
        self.next(self.evaluate)

    @step
    def evaluate(self):
        """State the verdict, from the ledger the escrow decorator kept."""
        entry = next((e for e in self.pf_ledger if e["step"] == "train"), None)
        self.bounty_status = entry["status"] if entry else "not locked"
        if entry is None:
            print(f"No escrow was locked, nothing was paid: {self.train_error}")
        elif self.train_error is not None:
            print(f"Training failed ({self.train_error.type}): bounty {entry['status']}")
        elif entry["status"] == "released":
            print(f"Accuracy {self.accuracy:.4f} >= {self.min_accuracy}: bounty paid, "
                  f"{entry['net_usdc']} USDC to {entry['recipient']} after a {entry['fee_usdc']} USDC fee")
        else:
            print(f"Accuracy {self.accuracy:.4f} < {self.min_accuracy:g}: bounty {entry['status']}")
        self.next(self.end)

    @card
    @step
    def end(self):
        """What was paid, refunded and left pending; the last line says how the bounty ended."""
        print(format_table(self.pf_ledger, title="Training bounty payments"))
        verdict = {"released": "bounty paid", "refunded": "bounty refunded"}.get(self.bounty_status,
                                                                               f"bounty {self.bounty_status}")
        self.summary = end_summary(self.pf_ledger, {"train": self.train_error},
                                   outcome=f"Training bounty: {verdict}")
        print(self.summary)
        append_ledger_card(current.card, self.pf_ledger, summary=self.summary)


if __name__ == "__main__":
    TrainingBountyFlow()
