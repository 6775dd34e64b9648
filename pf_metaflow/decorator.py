"""``@pf_escrow_step``: Purple Flea escrow around a Metaflow step.

The implementation is in ``_step_decorator``. The split exists because Metaflow,
while it initialises, imports our step decorator classes through its extension
mechanism: if this were the module that defines them, importing it first would
hand Metaflow a half-built module. So Metaflow is imported (and finishes
loading ``_step_decorator``) before anything here is defined.
"""

import metaflow  # noqa: F401  -- must finish initialising before the names below are read

from ._step_decorator import (  # noqa: E402
    BUDGET_ARTIFACT,
    ESCROWS_ARTIFACT,
    LEDGER_ARTIFACT,
    METADATA_TYPE,
    PfEscrowRuntimeError,
    PfEscrowStepDecorator,
    PfEscrowStepException,
    PfLedgerJoinDecorator,
    escrow_metadatum,
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
