"""The sandbox escrow: the Purple Flea escrow rules on a local SQLite file.

Two ways in: :class:`~pf_metaflow.sandbox.engine.SandboxEngine` in-process (what the
client uses when ``PF_ESCROW_URL`` is unset), or the HTTP server in
:mod:`pf_metaflow.sandbox.server` (``pf-metaflow sandbox serve``), which speaks the live
wire protocol plus the sandbox extensions (refund, idempotency keys, faucet, balances).
"""

from .engine import (
    PAYER_KEY,
    SANDBOX_PAYER,
    SANDBOX_WORKER,
    WORKER_KEY,
    SandboxEngine,
)

__all__ = ["PAYER_KEY", "SANDBOX_PAYER", "SANDBOX_WORKER", "WORKER_KEY", "SandboxEngine"]
