"""pf-metaflow's card type: ``--with card:type=pf_ledger`` shows the task's payment ledger."""

from pf_metaflow.card import PfLedgerCard

CARDS = [PfLedgerCard]
