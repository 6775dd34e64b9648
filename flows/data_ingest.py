"""A data bounty: a data agent is paid per delivery, and only for clean data.

The payment story
-----------------
1. ``start`` checks the terms (the schema, the null-rate limit) and runs
   ``preflight`` (the escrow service, who is paid, how much) before any money
   moves: a setup mistake stops the run there with one line.
2. ``ingest`` takes the agent's delivery: a CSV file (``--data_path``, or
   uploaded with the run as ``--data_file``). Before its body runs,
   ``@pf_escrow_step`` locks ``step_budget`` USDC for ``agent_wallet``.
3. The delivery is validated and the escrow settled when ``ingest`` ends:

   - readable, the agreed columns and types, null rate at most ``max_null_rate``:
     **released** to the agent (less the 1% fee);
   - missing file, missing column or a value of the wrong type: the step fails
     with the reason, the escrow is **refunded** with it, and ``@catch`` lets the
     run finish;
   - readable but too many empty cells: not an error in the agent's code, just
     not good enough, so the release gate ``null_rate <= max_null_rate`` fails
     and the escrow is **refunded** with the measured rate as the reason.
4. ``end`` says whether the delivery was accepted and prints what was paid,
   refunded and charged in fees.

Run it
------
    python flows/data_ingest.py run                                              # clean: paid
    python flows/data_ingest.py run --data_path flows/data/deliveries_dirty.csv       # null rate: refunded
    python flows/data_ingest.py run --data_path flows/data/deliveries_bad_schema.csv  # schema: refunded
    python flows/data_ingest.py run --data_path no/such/file.csv                      # missing: refunded
    python flows/data_ingest.py run --data_file my_delivery.csv                       # your own file

A relative ``--data_path`` is looked up in the current directory, then next to
this file (the default is the sample delivery in ``flows/data/``). To read it in
a remote step (``@kubernetes``, ``@batch``), pass ``--data_file`` (the file is
stored with the run) or ship CSVs with the code: ``--package-suffixes .py,.csv``.
"""

import os

from metaflow import FlowSpec, IncludeFile, JSONType, Parameter, card, catch, current, step

from pf_metaflow import format_table, pf_escrow_step, sandbox_or_required_agent
from pf_metaflow.card import append_ledger_card, end_summary
from pf_metaflow.params import USDC
from pf_metaflow.preflight import PreflightError, preflight
from workloads import DeliveryRejected, read_delivery

SCHEMA = '{"order_id": "int", "customer": "str", "amount": "float", "country": "str"}'


def locate(path: str) -> str:
    """``path`` as given if it exists, else the same path next to this flow file."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    beside = os.path.join(os.path.dirname(os.path.abspath(__file__)), path)
    return beside if os.path.exists(beside) else path


class DataIngestBountyFlow(FlowSpec):
    """Pay a data agent for a delivery that passes schema and null-rate checks."""

    agent_wallet = Parameter(
        # show_default=False: `run --help` must not evaluate the default, which refuses
        # to pick a payee when PF_ESCROW_URL points at the live service.
        "agent_wallet", default=sandbox_or_required_agent, show_default=False,
        help="Purple Flea agent id (ag_…) of the data agent. Default on the sandbox: "
             "its built-in worker; required on the live service.",
    )
    step_budget = Parameter("step_budget", type=USDC, default="1.50", help="USDC paid for a clean delivery.")
    data_path = Parameter(
        "data_path", default="data/deliveries.csv",
        help="CSV delivered by the agent (relative: current directory, then next to this flow).",
    )
    data_file = IncludeFile(
        "data_file", is_text=True, default=None,
        help="A local CSV uploaded and stored with the run; used instead of --data_path.",
    )
    schema = Parameter("schema", type=JSONType, default=SCHEMA,
                       help="JSON object: required column -> int, float or str.")
    max_null_rate = Parameter("max_null_rate", default=0.05, type=float,
                              help="Largest share of empty cells the agent is paid for.")

    @step
    def start(self):
        """Check the setup and the terms before any escrow exists."""
        if not isinstance(self.schema, dict) or not self.schema:
            raise PreflightError(f"--schema must be a JSON object of column -> type, got {self.schema!r}")
        if not 0.0 <= self.max_null_rate <= 1.0:
            raise PreflightError(f"--max_null_rate must be between 0 and 1, got {self.max_null_rate:g}")
        preflight(self)
        self.source = "--data_file" if self.data_file else self.data_path
        print(f"Bounty: {self.step_budget} USDC to {self.agent_wallet} for a clean delivery of "
              f"{self.source} (columns {', '.join(self.schema)}, null rate <= {self.max_null_rate:.1%})")
        self.next(self.ingest)

    @catch(var="ingest_error", print_exception=False)
    @pf_escrow_step(agent_wallet="agent_wallet", amount_usdc="step_budget",
                    release_if="null_rate <= max_null_rate")
    @step
    def ingest(self):
        """The agent's delivery: read it, check its schema, measure its null rate."""
        if self.data_file:
            text = self.data_file
        else:
            path = locate(self.data_path)
            if not os.path.isfile(path):
                raise DeliveryRejected(f"missing file: no CSV at {self.data_path}")
            with open(path, newline="", encoding="utf-8") as f:
                text = f.read()
        delivery = read_delivery(text, self.schema, self.source)
        self.rows = delivery.rows
        self.null_rate = delivery.null_rate
        print(f"{len(self.rows)} rows, {delivery.null_cells} of {delivery.cells} cells empty "
              f"(null rate {self.null_rate:.2%}, limit {self.max_null_rate:.2%})")
        self.next(self.end)

    @card
    @step
    def end(self):
        """What was paid, refunded and left pending; the last line says whether the delivery was accepted."""
        print(format_table(self.pf_ledger, title="Data bounty payments"))
        entry = next((e for e in self.pf_ledger if e["step"] == "ingest"), None)
        if entry is None:
            outcome = "Delivery not taken: no escrow was locked, nothing was paid"
        elif entry["status"] == "released":
            outcome = (f"Delivery accepted: {len(self.rows)} rows ingested; "
                       f"{entry['net_usdc']} USDC to {entry['recipient']}")
        else:
            outcome = f"Delivery rejected, escrow {entry['status']}"
        self.summary = end_summary(self.pf_ledger, {"ingest": self.ingest_error}, outcome=outcome)
        print(self.summary)
        append_ledger_card(current.card, self.pf_ledger, summary=self.summary)


if __name__ == "__main__":
    DataIngestBountyFlow()
