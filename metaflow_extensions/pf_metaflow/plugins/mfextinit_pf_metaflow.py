"""Registers pf-metaflow's step decorators with Metaflow.

Installing the package is enough for `--with pf_escrow_step:…` to work on a flow
that never imports pf_metaflow: Metaflow discovers this module through its
`metaflow_extensions` namespace package.
"""

STEP_DECORATORS_DESC = [
    ("pf_escrow_step", "pf_metaflow._step_decorator.PfEscrowStepDecorator"),
    ("pf_ledger_join", "pf_metaflow._step_decorator.PfLedgerJoinDecorator"),
]
