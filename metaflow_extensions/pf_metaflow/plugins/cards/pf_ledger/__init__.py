"""pf-metaflow's card type: ``--with card:type=pf_ledger`` shows the task's payment ledger.

Metaflow imports this in every process it runs: the card type's module is kept light
(the ledger code loads when a card renders).
"""

from pf_metaflow._ledger_card import PfLedgerCard

CARDS = [PfLedgerCard]
