"""``@pf_escrow_step``: Purple Flea escrow around a Metaflow step.

The classes Metaflow registers are in ``_step_decorator``, what a paid step does in
``_paid_step``. The split exists because Metaflow, while it initialises, imports our
step decorator classes through its extension mechanism: if this were the module that
defines them, importing it first would hand Metaflow a half-built module. So Metaflow is
imported (and finishes loading ``_step_decorator``) before anything here is defined.
"""

import metaflow  # noqa: F401  -- must finish initialising before the names below are read

from ._paid_step import escrow_metadatum  # noqa: E402
from ._step_decorator import (  # noqa: E402
    BUDGET_ARTIFACT,
    ESCROWS_ARTIFACT,
    LEDGER_ARTIFACT,
    METADATA_TYPE,
    PfEscrowRuntimeError,
    PfEscrowStepDecorator,
    PfEscrowStepException,
    PfLedgerJoinDecorator,
    pf_escrow_step,
)

__all__ = [
    "BUDGET_ARTIFACT",
    "ESCROWS_ARTIFACT",
    "LEDGER_ARTIFACT",
    "METADATA_TYPE",
    "PfEscrowRuntimeError",
    "PfEscrowStepDecorator",
    "PfEscrowStepException",
    "PfLedgerJoinDecorator",
    "escrow_metadatum",
    "pf_escrow_step",
]
