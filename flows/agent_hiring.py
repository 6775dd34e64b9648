"""An agent inside a paid step hires two sub-agents through escrow tool calls (MCP).

The payment story
-----------------
1. ``start`` plans the budget (``--total_budget_usdc``, all of it for ``hire``) and runs
   ``preflight``. On a sandbox it registers the two sub-agents (a translator and a
   summarizer) unless ``--sub_agents`` names them; on the live service they are required.
2. ``hire`` is the orchestrating agent's step. ``@pf_escrow_step`` locks its own fee
   (``--orchestrator_fee_usdc``) for ``agent_wallet``; the rest of the step's budget is the
   allowance of the escrow tools it hands the agent (``agent_escrow_tools``). The agent
   (a deterministic script standing in for an LLM: no model, no network) sees only tool
   schemas without ``casino_api_key`` and calls tools by name:

   - it asks its allowance, then tries to lock more than it has: refused, nothing created;
   - it hires the translator and the summarizer (one escrow each);
   - the translator delivers: the agent marks its escrow done (released when the step ends);
   - the summarizer fails its task: the agent leaves its escrow open (given back when the
     step ends).

   Leaving the ``with`` block settles both; the step succeeds, so its own fee is released.
3. ``end`` prints the run's ledger: the orchestrator paid, the translator paid, the
   summarizer refunded. ``pf-metaflow ledger AgentHiringFlow/<run>`` shows the same rows.

Run it
------
    python flows/agent_hiring.py run                       # embedded sandbox, in-process MCP
    python flows/agent_hiring.py run --fail_at hire        # the step fails: all three refunded

Against a sandbox server with ``/mcp`` (``PF_ESCROW_URL=http://127.0.0.1:PORT``, its key in
``PF_API_KEY``) or the live service (``PF_ESCROW_URL=https://escrow.purpleflea.com``,
``--agent_wallet ag_… --sub_agents ag_…,ag_…``) the same code talks streamable HTTP to ``/mcp``.
"""

import json
import os

from metaflow import FlowSpec, Parameter, card, catch, current, step

from pf_metaflow import format_table, pf_escrow_step, sandbox_or_required_agent
from pf_metaflow.card import append_ledger_card, end_summary
from pf_metaflow.params import USDC
from pf_metaflow.preflight import PreflightError, preflight


def sandbox_sub_agents(names):
    """Register sub-agents on the sandbox the run pays through (the faucet's register)."""
    url = os.environ.get("PF_ESCROW_URL", "").strip()
    if url.lower().startswith(("http://", "https://")):
        import requests

        return [requests.post(url.rstrip("/") + "/faucet/register", json={"name": n}, timeout=10)
                .json()["agent_id"] for n in names]
    from pf_metaflow._embedded import sandbox_path
    from pf_metaflow.sandbox.engine import SandboxEngine

    engine = SandboxEngine(sandbox_path(url))
    return [engine.register(n)["agent_id"] for n in names]


def orchestrator(tools, sub_agents, say=print):
    """The "agent": what an LLM would do with the tools, as a fixed script. It only ever sees
    ``tools.tool_specs()`` and the results of ``tools.call``."""
    names = [spec["name"] for spec in tools.tool_specs()]
    say(f"agent sees tools: {', '.join(names)}")

    def use(name, **arguments):
        result = tools.call(name, arguments)
        say(f"agent -> {name}({json.dumps(arguments)})\n      <- {'ERROR ' if result.is_error else ''}{result.text}")
        return result

    allowance = use("escrow_allowance").json
    use("create_escrow", amount_usd=float(allowance["remaining_usd"]) + 5, counterparty_agent_id=sub_agents[0],
        description="translate the whole corpus, twice")  # over budget: refused, nothing created
    translator, summarizer = sub_agents
    hired = {
        "translate": use("create_escrow", amount_usd=1.50, counterparty_agent_id=translator,
                         description="translate the report into French").json["escrow_id"],
        "summarize": use("create_escrow", amount_usd=1.00, counterparty_agent_id=summarizer,
                         description="summarize the report in 100 words").json["escrow_id"],
    }
    # The sub-agents work (simulated, deterministic): the translator delivers, the summarizer fails.
    delivered = {"translate": "Le rapport, traduit.", "summarize": None}
    for task, escrow_id in hired.items():
        if delivered[task]:
            use("mark_complete", escrow_id=escrow_id)  # paid when the step ends well
        else:
            say(f"agent: {task} failed; its escrow {escrow_id} is left open (given back at the end)")
    use("get_escrow", escrow_id=hired["summarize"])
    return {"translation": delivered["translate"], "summary": delivered["summarize"], "escrows": hired}


class AgentHiringFlow(FlowSpec):
    """A step's agent hires two sub-agents through escrow tools; one fails and is refunded."""

    agent_wallet = Parameter(
        "agent_wallet", default=sandbox_or_required_agent, show_default=False,
        help="The orchestrating agent (ag_…) paid its fee for the hire step. Default on the sandbox: "
             "its built-in worker; required on the live service.")
    sub_agents = Parameter("sub_agents", default="",
                           help="Two comma-separated agent ids to hire. Default on a sandbox: two registered there.")
    total_budget_usdc = Parameter("total_budget_usdc", type=USDC, default="4.00",
                                  help="The run's budget, all for the hire step.")
    orchestrator_fee_usdc = Parameter("orchestrator_fee_usdc", type=USDC, default="1.00",
                                      help="The orchestrator's own fee; the rest of the budget is its allowance.")
    fail_at = Parameter("fail_at", default="", help="'hire': the step fails after hiring.")

    @step
    def start(self):
        if self.fail_at not in ("", "hire"):
            raise PreflightError(f"--fail_at takes 'hire' or nothing, got {self.fail_at!r}")
        self.pf_budget = preflight(self, total_budget_usdc=self.total_budget_usdc, step_weights={"hire": 1})
        hires = [a.strip() for a in self.sub_agents.split(",") if a.strip()]
        if not hires:
            from pf_metaflow import default_client

            if not default_client().is_sandbox:
                raise PreflightError("--sub_agents ag_…,ag_… is required on the live service")
            hires = sandbox_sub_agents(["translator", "summarizer"])
        if len(hires) != 2:
            raise PreflightError(f"--sub_agents takes two agent ids, got {len(hires)}")
        self.hires = hires
        print(f"Budget {self.total_budget_usdc} USDC: {self.orchestrator_fee_usdc} for {self.agent_wallet}, "
              f"the rest for the agents it hires ({', '.join(hires)})")
        self.next(self.hire)

    @catch(var="hire_error", print_exception=False)
    @pf_escrow_step(agent_wallet="agent_wallet", amount_usdc="orchestrator_fee_usdc")
    @step
    def hire(self):
        from pf_metaflow.mcp import agent_escrow_tools

        with agent_escrow_tools(self) as tools:
            self.work = orchestrator(tools, self.hires)
            if self.fail_at == "hire":
                raise RuntimeError("the orchestrator crashed after hiring")
        self.next(self.end)

    @card
    @step
    def end(self):
        print(format_table(self.pf_ledger, title="Agent hiring payments"))
        self.summary = end_summary(self.pf_ledger, {"hire": self.hire_error}, outcome="Agent hiring")
        print(self.summary)
        append_ledger_card(current.card, self.pf_ledger, summary=self.summary)


if __name__ == "__main__":
    AgentHiringFlow()
