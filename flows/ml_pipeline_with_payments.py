"""An ML pipeline whose every stage is done, and paid for, by an agent.

The payment story
-----------------
1. ``start`` runs ``preflight`` (docs/design.md, "Preflight"): the escrow service,
   the payee, and the budget per step from ``total_budget_usdc`` and
   ``step_weights`` (exact to the micro-USDC, every paid stage with a share of at
   least the 0.10 USDC escrow minimum). A setup mistake stops the run here with
   one line, before any money moves.
2. ``ingest``, ``train``, ``evaluate`` and ``deploy`` are billable: before each
   one's body runs, ``@pf_escrow_step`` locks that step's budget in escrow for
   ``agent_wallet``; when the step succeeds the agent is paid (less the 1% fee),
   when it raises the escrow is refunded and ``@catch`` records the error.
3. A stage that has nothing to work on is not run at all, so it is never
   billed: ``check_data`` and ``check_model`` end the run early after a failed
   ``ingest`` or ``train``, and ``accuracy_gate`` sends the run to ``deploy``
   only when ``evaluate`` succeeded and the held-out accuracy is at least
   ``min_accuracy``. A skipped ``deploy`` locks nothing and pays nothing.
4. ``end`` prints the payment summary (which stage failed and why; paid, refunded,
   left pending; a last ``RESULT:`` line) and renders the ledger as a Metaflow card
   (``python flows/ml_pipeline_with_payments.py card view end``). A stage whose escrow
   could not be created (refused, or the rate limit's wait ran past
   ``PF_ESCROW_MAX_WAIT``) did not run and was not paid: the summary lists it ``UNPAID``
   with the reason and ends ``RESULT: UNPAID: …``, and ``end`` fails, so the run exits
   non-zero.

The routing steps use Metaflow's conditional transitions
(``self.next({...}, condition=...)``, Metaflow 2.18 or later; supported by the
local runtime and Argo Workflows, not by AWS Step Functions). ``@catch`` cannot
sit on a step that chooses its successor, which is why the checks are steps of
their own.

Run it
------
    python flows/ml_pipeline_with_payments.py run                        # all four paid
    python flows/ml_pipeline_with_payments.py run --min_accuracy 0.99    # deploy skipped
    python flows/ml_pipeline_with_payments.py run --fail_at train        # train refunded, run ends
    python flows/ml_pipeline_with_payments.py run --fail_at deploy       # deploy refunded
    python flows/ml_pipeline_with_payments.py run --total_budget_usdc 20 \\
        --step_weights '{"ingest": 0.1, "train": 0.6, "evaluate": 0.2, "deploy": 0.1}'

On the live service (``PF_ESCROW_URL`` and ``PF_API_KEY`` set) ``--agent_wallet
ag_…`` is required; on the sandbox it defaults to the built-in worker.
"""

from metaflow import FlowSpec, JSONType, Parameter, card, catch, current, step

from pf_metaflow import format_table, pf_escrow_step, sandbox_or_required_agent
from pf_metaflow.card import append_ledger_card, end_summary, fail_if_unpaid
from pf_metaflow.params import USDC
from pf_metaflow.preflight import PreflightError, preflight
from workloads import (
    Model,
    accuracy,
    fail_if_asked,
    fit_logistic,
    load_bundle,
    make_blobs,
    model_bundle,
    parse_fail_at,
    split,
)

BILLED_STEPS = ["ingest", "train", "evaluate", "deploy"]
WEIGHTS = '{"ingest": 0.15, "train": 0.5, "evaluate": 0.2, "deploy": 0.15}'


class MLPipelineWithPayments(FlowSpec):
    """Ingest, train, evaluate and deploy a model, each stage paid from the run's budget."""

    agent_wallet = Parameter(
        # show_default=False: `run --help` must not evaluate the default, which refuses
        # to pick a payee when PF_ESCROW_URL points at the live service.
        "agent_wallet", default=sandbox_or_required_agent, show_default=False,
        help="Purple Flea agent id (ag_…) paid for each stage. Default on the sandbox: "
             "its built-in worker; required on the live service.",
    )
    total_budget_usdc = Parameter("total_budget_usdc", type=USDC, default="12.00",
                                  help="USDC for the whole run, split over the stages by step_weights.")
    step_weights = Parameter("step_weights", type=JSONType, default=WEIGHTS,
                             help="JSON object: step name -> fraction of the budget (summing to at most 1).")
    min_accuracy = Parameter("min_accuracy", default=0.85, type=float,
                             help="Held-out accuracy required before the model is deployed.")
    seed = Parameter("seed", default=7, type=int, help="Seed of the synthetic dataset.")
    fail_at = Parameter("fail_at", default="",
                        help="Inject failures: comma-separated stages that raise (ingest, train, evaluate, deploy).")

    @step
    def start(self):
        """Preflight and plan the budget: every stage's share, exact, before anything is locked."""
        try:
            self.failing = parse_fail_at(self.fail_at, BILLED_STEPS)
        except ValueError as exc:
            raise PreflightError(str(exc)) from None
        self.pf_budget = preflight(self, total_budget_usdc=self.total_budget_usdc,
                                   step_weights=self.step_weights)
        print(f"Budget {self.pf_budget['total_usdc']} USDC for {self.agent_wallet}:")
        for name, amount in self.pf_budget["steps"].items():
            print(f"  {name:<9} {amount} USDC")
        self.halted = None
        self.next(self.ingest)

    @catch(var="ingest_error", print_exception=False)
    @pf_escrow_step(agent_wallet="agent_wallet")
    @step
    def ingest(self):
        """Load the data and hold out a test split."""
        fail_if_asked("ingest", self.failing)
        data = make_blobs(800, self.seed)
        labels = {y for _, y in data}
        if labels != {0, 1}:
            raise ValueError(f"expected two classes, got {sorted(labels)}")
        self.train_set, self.holdout = split(data)
        print(f"{len(self.train_set)} training rows, {len(self.holdout)} held out")
        self.next(self.check_data)

    @step
    def check_data(self):
        """Train only if there is data: a failed ingest ends the run, and nothing more is billed."""
        self.route = "train" if self.ingest_error is None else "stop"
        if self.route == "stop":
            self.halted = "ingest failed; train, evaluate and deploy were not run"
        self.next({"train": self.train, "stop": self.end}, condition="route")

    @catch(var="train_error", print_exception=False)
    @pf_escrow_step(agent_wallet="agent_wallet")
    @step
    def train(self):
        """Fit the classifier."""
        fail_if_asked("train", self.failing)
        model = fit_logistic(self.train_set)
        self.model = model.to_dict()
        self.train_accuracy = accuracy(model, self.train_set)
        print(f"trained: {self.model}, training accuracy {self.train_accuracy:.4f}")
        self.next(self.check_model)

    @step
    def check_model(self):
        """Evaluate only a model that exists."""
        self.route = "evaluate" if self.train_error is None else "stop"
        if self.route == "stop":
            self.halted = "train failed; evaluate and deploy were not run"
        self.next({"evaluate": self.evaluate, "stop": self.end}, condition="route")

    @catch(var="evaluate_error", print_exception=False)
    @pf_escrow_step(agent_wallet="agent_wallet")
    @step
    def evaluate(self):
        """Measure the model on the held-out split."""
        fail_if_asked("evaluate", self.failing)
        self.accuracy = accuracy(Model.from_dict(self.model), self.holdout)
        print(f"held-out accuracy {self.accuracy:.4f} (deploy needs {self.min_accuracy})")
        self.next(self.accuracy_gate)

    @step
    def accuracy_gate(self):
        """Deploy only an evaluated model that meets the bar; otherwise skip deploy unpaid."""
        if self.evaluate_error is not None:
            self.halted = "evaluate failed; deploy was not run"
        elif self.accuracy < self.min_accuracy:
            self.halted = (f"accuracy {self.accuracy:.4f} is below min_accuracy {self.min_accuracy:g}; "
                           "deploy was skipped and not paid")
        self.route = "stop" if self.halted else "deploy"
        self.next({"deploy": self.deploy, "stop": self.end}, condition="route")

    @catch(var="deploy_error", print_exception=False)
    @pf_escrow_step(agent_wallet="agent_wallet")
    @step
    def deploy(self):
        """Publish the model as a checksummed bundle and check it serves what was evaluated."""
        fail_if_asked("deploy", self.failing)
        bundle = model_bundle(Model.from_dict(self.model), version=current.pathspec)
        served, evaluated = load_bundle(bundle), Model.from_dict(self.model)
        if any(served.predict(x) != evaluated.predict(x) for x, _ in self.holdout[:50]):
            raise RuntimeError("the deployed bundle does not predict like the evaluated model")
        self.deployment = {"version": bundle["version"], "sha256": bundle["sha256"]}
        print(f"deployed {bundle['version']} (sha256 {bundle['sha256'][:12]}…)")
        self.next(self.end)

    @card
    @step
    def end(self):
        """Payment summary, in the log and as a card; the last lines say how the run ended."""
        errors = {s: getattr(self, f"{s}_error", None) for s in BILLED_STEPS}
        if getattr(self, "deployment", None):
            outcome = f"Pipeline finished: model deployed ({self.deployment['version']})"
        elif self.halted:
            outcome = f"Pipeline stopped early: {self.halted}"
        else:
            outcome = "Pipeline ran every stage, but deploy failed: no model was deployed"
        print(format_table(self.pf_ledger, title="Payment summary"))
        self.summary = end_summary(self.pf_ledger, errors, outcome=outcome)
        print(self.summary)
        append_ledger_card(current.card, self.pf_ledger, summary=self.summary)
        fail_if_unpaid(self.pf_ledger)  # unpaid work: the run exits non-zero, not successful


if __name__ == "__main__":
    MLPipelineWithPayments()
