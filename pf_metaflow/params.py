"""Helpers for the Metaflow Parameters a paying flow declares."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from .ids import SANDBOX_WORKER

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


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
    """
    if is_sandbox_url(os.environ.get("PF_ESCROW_URL")):
        return SANDBOX_WORKER
    raise ValueError(
        "--agent_wallet is required: PF_ESCROW_URL points at the live Purple Flea service, "
        "and pf-metaflow never picks a payee for real money"
    )
