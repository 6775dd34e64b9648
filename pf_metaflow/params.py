"""Helpers for the Metaflow Parameters a paying flow declares."""

from __future__ import annotations

import os
from typing import Any
from decimal import Decimal
from urllib.parse import urlsplit

from metaflow._vendor import click

from .errors import InvalidAmount
from .ids import SANDBOX_WORKER
from .money import parse_usdc, usdc_str

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
# The agent_wallet default a compiled deployment carries: none (given at trigger time).
DEPLOY_TIME_AGENT = ""


def is_sandbox_url(url: str | None) -> bool:
    """True for the embedded sandbox (no URL, ``sandbox:``) or a sandbox server on loopback."""
    if not url or url.startswith("sandbox:"):
        return True
    host = urlsplit(url).hostname or ""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def sandbox_or_required_agent(context: Any = None, deploy_time: bool = False) -> str:
    """Default for an ``agent_wallet`` Parameter.

    On the sandbox, the built-in worker ``ag_sandbox_worker`` does the work. On the
    live Purple Flea service nobody should be paid by default, so the user must
    name the agent: ``--agent_wallet ag_…``. Declare the Parameter with
    ``show_default=False``: Click renders a callable default for ``--help``, and on
    the live service this one refuses to produce a value::

        agent_wallet = Parameter("agent_wallet", default=sandbox_or_required_agent,
                                 show_default=False, help="the agent paid (ag_…)")

    Compiling a deployment (``argo-workflows create``, ``step-functions create``: Metaflow
    calls this with ``deploy_time=True``) bakes no payee in, whatever ``PF_ESCROW_URL``
    says on the compiling machine: the default is empty, so the payee is given when the
    deployment is triggered (``trigger --agent_wallet ag_…``); left empty, preflight in
    ``start`` stops the run before any money moves. (A sandbox worker baked in as the
    deployment's default would be paid by a deployment that runs against the live service;
    a refusal here would make every live deployment impossible to compile.)
    """
    if deploy_time:
        return DEPLOY_TIME_AGENT
    url = os.environ.get("PF_ESCROW_URL")
    if is_sandbox_url(url):
        return SANDBOX_WORKER
    raise ValueError(
        f"--agent_wallet is required: PF_ESCROW_URL points at the live Purple Flea service "
        f"(PF_ESCROW_URL={live_url_shown(url)!r} is neither sandbox: nor a loopback sandbox "
        "server), and pf-metaflow never picks a payee for real money"
    )


def live_url_shown(url: str | None) -> str:
    """The scheme, host and port of ``url``: enough to recognise it, never a secret in it."""
    parts = urlsplit((url or "").strip())
    host = parts.hostname or ""
    port = f":{parts.port}" if _port(parts) else ""
    return f"{parts.scheme}://{host}{port}" if parts.scheme else (url or "")


def _port(parts: Any) -> int | None:
    try:
        return parts.port
    except ValueError:
        return None


class UsdcParamType(click.ParamType):
    """A Metaflow Parameter type for USDC amounts: ``12``, ``12.5``, ``"12.00"`` or a
    ``Decimal``, from the command line or ``Runner(...).run(total_budget_usdc=12)``.

    The value is a ``Decimal``, exact to the micro-USDC (never a float); NaN, infinities,
    negatives, more than 6 decimal places and amounts under 0.10 USDC are refused with
    one line. The Runner API learns this type's Python types from pf-metaflow's Metaflow
    extension (``metaflow_extensions/pf_metaflow/config``)::

        total_budget_usdc = Parameter("total_budget_usdc", type=USDC, default="12.00")
    """

    name = "USDC"

    def convert(self, value: Any, param: Any, ctx: Any) -> Decimal:
        if isinstance(value, float):
            value = repr(value)  # the shortest text that reads back as this float: 12.1 -> "12.1"
        try:
            amount = parse_usdc(value, name=f"--{param.name}" if param is not None else "amount")
        except InvalidAmount as exc:
            self.fail(exc.message, param, ctx)
        if _triggering_a_deployment(ctx):
            # `argo-workflows trigger` / `step-functions trigger` send parameter values as JSON
            # (json.dumps, which takes no Decimal); the task's `init` reads the text back exactly.
            return usdc_str(amount)
        return amount

    def __repr__(self) -> str:
        return "USDC"


def _triggering_a_deployment(ctx: Any) -> bool:
    """True when Click is parsing ``<deployer> trigger`` (e.g. ``argo-workflows trigger``)."""
    if ctx is None or getattr(ctx, "info_name", None) != "trigger":
        return False
    parent = getattr(ctx, "parent", None)
    return parent is not None and getattr(parent, "info_name", None) not in (None, "run", "resume")


USDC = UsdcParamType()
# Deployment compilers name a Parameter's type by ``type.__name__`` (Argo Workflows records it
# with the parameter); a Click type instance has none of its own.
USDC.__name__ = "USDC"
