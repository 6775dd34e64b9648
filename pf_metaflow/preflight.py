"""Preflight: every setup mistake stops the run in ``start``, with one line, before money moves.

Call it first thing in your flow's ``start`` step::

    from pf_metaflow import preflight

    @step
    def start(self):
        self.pf_budget = preflight(self, total_budget_usdc=self.total_budget_usdc,
                                   step_weights=self.step_weights)
        self.next(self.ingest)

It finds the paid steps (those with ``@pf_escrow_step``, ``--with`` included), and
checks, in this order:

1. the escrow service: ``PF_ESCROW_URL`` / ``PF_API_KEY`` make a client (a key is
   set, never sent over plain http to a non-loopback host), and the service answers;
2. the payee of every paid step: a well-formed agent id, not the payer itself
   (where the service can say whose key this is), registered in the sandbox;
3. the budget: planned exactly, every paid step has a share (or an explicit amount),
   every share is at least the service minimum of 0.10 USDC;
4. timeouts: ``timeout_hours`` within 1-720, and no step's ``@timeout`` outlasts its
   escrow (the service would refund it while the agent still works).

A problem raises :class:`PreflightError`, a ``MetaflowException``: Metaflow prints its
one-line message without a traceback and the run exits non-zero. See docs/design.md.
"""

from __future__ import annotations

import os
from decimal import Decimal
from typing import Any, Mapping, Optional

from metaflow.exception import MetaflowException

from .budget import Budget, allot_shards, plan_budget
from .errors import PurpleFleaError
from .ids import check_agent_id
from .money import MIN_ESCROW_USDC, parse_usdc, usdc_str

DECORATOR = "pf_escrow_step"
DEFAULT_TIMEOUT_HOURS = 24  # the service's default escrow timeout


class PreflightError(MetaflowException):
    """A setup mistake found before any escrow was created; the message names the fix."""

    headline = "pf-metaflow preflight failed (no escrow was created, no money moved)"


def preflight(
    flow: Any,
    *,
    total_budget_usdc: Any = None,
    step_weights: Any = None,
    shards: Optional[Mapping[str, int]] = None,
    check_service: bool = True,
) -> Optional[Budget]:
    """Check a paying flow's setup from its ``start`` step; return the planned budget.

    Parameters
    ----------
    flow : FlowSpec
        ``self`` in the ``start`` step.
    total_budget_usdc : number, str or Decimal, optional
        The run's budget. With it, the budget is planned (``plan_budget``) by
        ``step_weights`` and returned, for ``self.pf_budget``.
    step_weights : dict or JSON str, optional
        Step name -> fraction of the budget. Default: the whole budget to the one
        paid step, when there is exactly one.
    shards : dict, optional
        Foreach steps paid per shard: step name -> number of shards
        (``allot_shards`` is applied).
    check_service : bool
        Also ask the escrow service (reachable, whose key, payee known). Default True.

    Returns
    -------
    dict or None
        The budget plan when ``total_budget_usdc`` was given, else None.

    Raises
    ------
    PreflightError
        One line naming the problem and the fix; nothing was locked.
    """
    paid = paid_steps(flow)
    budget = _plan(flow, paid, total_budget_usdc, step_weights, shards)
    client = _client() if check_service else None
    payer = _payer(client) if client is not None else None
    for name, attrs in paid.items():
        _check_payee(flow, name, attrs, client, payer)
        _check_amount(flow, name, attrs, budget)
        _check_timeouts(flow, name, attrs)
    where = getattr(client, "url", None) or "(service not checked)"
    print(f"pf-metaflow preflight ok: {len(paid)} paid step(s) "
          f"({', '.join(paid) or 'none'}), escrow {where}" + (f", payer {payer}" if payer else ""))
    return budget


def paid_steps(flow: Any) -> dict[str, dict]:
    """Step name -> the ``@pf_escrow_step`` attributes of every step the run bills."""
    out: dict[str, dict] = {}
    order = list(getattr(getattr(flow, "_graph", None), "sorted_nodes", None) or [])
    funcs = sorted(getattr(flow, "_steps", []),
                   key=lambda f: order.index(f.__name__) if f.__name__ in order else len(order))
    for func in funcs:
        for deco in getattr(func, "decorators", []):
            if getattr(deco, "name", None) != DECORATOR:
                continue
            only = deco.attributes.get("steps")
            if only and func.__name__ not in {s.strip() for s in str(only).split(",")}:
                continue
            out[func.__name__] = dict(deco.attributes, _decorators=func.decorators)
    return out


def _fail(message: str) -> PreflightError:
    return PreflightError(" ".join(message.split()))


# -- 1. the service ----------------------------------------------------------------------


def _client() -> Any:
    from .client import default_client

    url = os.environ.get("PF_ESCROW_URL", "").strip()
    try:
        client = default_client()
    except PurpleFleaError as exc:
        raise _fail(exc.message) from None
    try:
        client.capabilities()
    except PurpleFleaError as exc:
        raise _fail(
            f"the escrow service (PF_ESCROW_URL={url!r}) did not answer: {exc.message} "
            "(a sandbox server starts with `pf-metaflow sandbox serve`; unset PF_ESCROW_URL to "
            "use the embedded sandbox)"
        ) from None
    return client


def _is_sandbox(client: Any) -> bool:
    """Test money? ``EscrowClient.is_sandbox`` where it exists, else what the client shows."""
    try:
        flag = getattr(client, "is_sandbox", None)
        if flag is not None:
            return bool(flag)
        return bool(getattr(client, "is_embedded", False)) or "faucet" in client.capabilities()
    except PurpleFleaError:
        return False


def _payer(client: Any) -> Optional[str]:
    """The agent whose key pays, where the service can say (sandboxes); else None."""
    try:
        answer = client.balance()
    except PurpleFleaError as exc:
        raise _fail(f"the escrow service at {client.url} refused PF_API_KEY: {exc.message}") from None
    return (answer or {}).get("agent_id")


# -- 2. the payee ------------------------------------------------------------------------


def _resolve(flow: Any, raw: Any) -> Any:
    """A decorator attribute: the name of a flow attribute or Parameter, else a literal."""
    if isinstance(raw, str) and raw.isidentifier() and hasattr(flow, raw):
        return getattr(flow, raw)
    return raw


def _check_payee(flow: Any, step: str, attrs: dict, client: Any, payer: Optional[str]) -> None:
    raw = attrs.get("agent_wallet") or "agent_wallet"
    payee = _resolve(flow, raw)
    what = f"--{raw}" if raw == "agent_wallet" or isinstance(payee, str) and payee != raw else "agent_wallet"
    try:
        check_agent_id(payee, name=what)
    except PurpleFleaError as exc:
        raise _fail(f"step {step!r}: {exc.message}") from None
    if payer is not None and payee == payer:
        raise _fail(
            f"step {step!r}: {what} {payee} is the payer itself (the agent of PF_API_KEY); the "
            "service refuses an escrow to oneself (self_escrow): pay another agent, e.g. "
            "--agent_wallet ag_sandbox_worker on the sandbox"
        )
    if client is not None and _is_sandbox(client):
        agents = _sandbox_agents(client)
        if agents is not None and payee not in agents:
            where = str(client.url)[len("sandbox://"):] if client.is_embedded else client.url
            raise _fail(
                f"step {step!r}: {what} {payee} is not an agent of the sandbox at {where}: register "
                "it (pf-metaflow sandbox register NAME) or leave --agent_wallet out to pay "
                "ag_sandbox_worker"
            )


def _sandbox_agents(client: Any) -> Optional[set]:
    """The agents a sandbox knows (its database, or a server's ``GET /sandbox/balances``);
    None when it cannot be read, and the check is left to the create."""
    if client.is_embedded:
        from .sandbox.engine import SandboxEngine

        return set(SandboxEngine(str(client.url)[len("sandbox://"):]).balances()["agents"])
    import requests

    try:
        answer = requests.get(f"{client.url}/sandbox/balances", timeout=5)
        return set(answer.json()["agents"]) if answer.ok else None
    except (requests.RequestException, ValueError, KeyError, TypeError):
        return None


# -- 3. the budget -----------------------------------------------------------------------


def _plan(flow: Any, paid: dict, total: Any, weights: Any, shards: Optional[Mapping[str, int]]) -> Optional[Budget]:
    if total is None:
        return getattr(flow, "pf_budget", None)
    if weights is None:
        if len(paid) != 1:
            raise _fail(
                f"give step_weights: the budget must be split over {len(paid)} paid steps "
                f"({', '.join(paid) or 'none'})"
            )
        weights = {next(iter(paid)): 1}
    try:
        budget = plan_budget(total, weights, flow=flow)
        for step, count in (shards or {}).items():
            budget = allot_shards(budget, step, count)
    except PurpleFleaError as exc:
        raise _fail(f"{exc.message}") from None
    return budget


def _check_amount(flow: Any, step: str, attrs: dict, budget: Optional[Budget]) -> None:
    raw = attrs.get("amount_usdc")
    key = attrs.get("budget_key") or step
    if raw is not None:
        try:
            amount = parse_usdc(_resolve(flow, raw), name=f"{raw}" if isinstance(raw, str) else "amount_usdc")
        except PurpleFleaError as exc:
            raise _fail(f"step {step!r}: {exc.message}") from None
        if budget is not None and key in budget.get("steps", {}) and amount > Decimal(budget["steps"][key]):
            raise _fail(
                f"step {step!r} locks {usdc_str(amount)} USDC, more than its "
                f"{budget['steps'][key]} USDC budget: lower the amount or raise its weight"
            )
        return
    if budget is None:
        raise _fail(
            f"step {step!r} is paid but has no amount_usdc and the run has no budget: give "
            "--total_budget_usdc (or amount_usdc= on the decorator)"
        )
    share = budget.get("steps", {}).get(key)
    if share is None or Decimal(share) == 0:
        planned = ", ".join(f"{k}={v}" for k, v in budget.get("steps", {}).items() if Decimal(v)) or "nothing"
        raise _fail(
            f"paid step {step!r} has no share of the budget (step_weights gives it "
            f"{'0' if share is not None else 'no weight'}; planned: {planned}): give {key!r} a "
            "weight in --step_weights"
        )
    if Decimal(share) < MIN_ESCROW_USDC:
        raise _fail(
            f"paid step {step!r} gets {share} USDC, below the {usdc_str(MIN_ESCROW_USDC)} USDC "
            "escrow minimum: raise --total_budget_usdc or its weight"
        )


# -- 4. timeouts -------------------------------------------------------------------------


def _check_timeouts(flow: Any, step: str, attrs: dict) -> None:
    raw = attrs.get("timeout_hours")
    hours = DEFAULT_TIMEOUT_HOURS
    if raw is not None:
        value = _resolve(flow, raw)
        try:
            hours = int(str(value))
        except ValueError:
            hours = -1
        if not 1 <= hours <= 720 or str(hours) != str(value).strip():
            raise _fail(
                f"step {step!r}: timeout_hours {value!r} is not a whole number of hours from 1 to 720 "
                "(the service's range; its default is 24)"
            )
    for deco in attrs.get("_decorators", []):
        if getattr(deco, "name", None) != "timeout":
            continue
        a = deco.attributes
        seconds = float(a.get("seconds") or 0) + 60 * float(a.get("minutes") or 0) + 3600 * float(a.get("hours") or 0)
        if seconds > hours * 3600:
            raise _fail(
                f"step {step!r}: its @timeout ({seconds / 3600:g} h) outlasts its escrow "
                f"(timeout_hours={hours}): the service would refund the escrow while the agent "
                "still works; raise timeout_hours on @pf_escrow_step or shorten @timeout"
            )
