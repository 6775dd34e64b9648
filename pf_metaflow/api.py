"""One-call helpers over the default escrow client, in the spirit of ``requests.api``.

::

    from pf_metaflow.api import pf_create, pf_release, pf_refund

    escrow = pf_create("ag_sandbox_worker", "2.50", "label 1,000 images")
    ...
    pf_release(escrow)        # or pf_refund(escrow) when the work failed

Each takes ``client=`` to use a specific :class:`~pf_metaflow.client.EscrowClient`;
otherwise :func:`~pf_metaflow.client.default_client` (``PF_ESCROW_URL`` /
``PF_API_KEY``, or the embedded sandbox when they are unset).
"""

from __future__ import annotations

import os
from typing import Optional, Union

from .client import Escrow, EscrowClient, Settlement, default_client
from .ids import check_agent_id
from .money import AmountLike, parse_usdc

__all__ = ["pf_create", "pf_release", "pf_refund", "pf_get"]

EscrowRef = Union[Escrow, str]


def pf_create(
    agent_wallet: str,
    amount_usdc: AmountLike,
    description: str = "pf-metaflow escrow",
    *,
    timeout_hours: Optional[int] = None,
    referral_code: Optional[str] = None,
    idempotency_key: Optional[str] = None,
    client: Optional[EscrowClient] = None,
) -> Escrow:
    """Lock ``amount_usdc`` USDC in escrow for the agent ``agent_wallet`` (``ag_…``).

    Parameters
    ----------
    agent_wallet : str
        The Purple Flea agent id to pay (not an on-chain 0x address).
    amount_usdc : Decimal, str, int or float
        At least 0.10, at most 6 decimal places.
    description : str
        At least 3 characters; what the escrow pays for.
    timeout_hours : int, optional
        1-720; the service's default is 24. An escrow never released is refunded
        after this, minus the 1% commission.
    referral_code : str, optional
        Default ``$PF_REFERRAL_CODE``.
    idempotency_key : str, optional
        Makes a create safe to retry on servers that honour it (the sandbox). The
        live service ignores it: the client then logs a warning (once) and the
        returned escrow's ``idempotency_honoured`` is False.
    client : EscrowClient, optional
        Default :func:`default_client`.
    """
    # Validated here too so the messages name this function's parameters.
    check_agent_id(agent_wallet, name="agent_wallet")
    amount = parse_usdc(amount_usdc, name="amount_usdc")
    if referral_code is None:
        referral_code = os.environ.get("PF_REFERRAL_CODE") or None
    return (client or default_client()).create(
        amount,
        counterparty_agent_id=agent_wallet,
        description=description,
        timeout_hours=timeout_hours,
        referral_code=referral_code,
        idempotency_key=idempotency_key,
    )


def pf_release(escrow: EscrowRef, *, client: Optional[EscrowClient] = None) -> Settlement:
    """Pay the escrow to its counterparty, less the 1% commission."""
    return (client or default_client()).release(escrow)


def pf_refund(
    escrow: EscrowRef, *, creator_id: Optional[str] = None, client: Optional[EscrowClient] = None
) -> Settlement:
    """Give the escrow back to the payer (``refund_pending`` on the live service, only for
    an escrow this key created: ``creator_id`` names the creator you expect)."""
    return (client or default_client()).refund(escrow, creator_id=creator_id)


def pf_get(escrow: EscrowRef, *, client: Optional[EscrowClient] = None) -> Escrow:
    """Read the escrow's current state."""
    return (client or default_client()).get(escrow)
