"""Read what a run paid, with the Metaflow client.

    python examples/read_ledger.py MLPipelineWithPayments          # its latest run
    python examples/read_ledger.py MLPipelineWithPayments/1234     # one run

Run it from the directory the flow ran in (or with your Metaflow metadata
service configured). The same from the shell, as a table or JSON:

    pf-metaflow ledger MLPipelineWithPayments/1234
    pf-metaflow ledger MLPipelineWithPayments/1234 --json
"""

import sys

from metaflow import Flow, Run, namespace

from pf_metaflow import ledger_of, totals


def main(spec: str) -> None:
    namespace(None)  # a run started by anyone
    run = Run(spec) if "/" in spec else Flow(spec).latest_run
    print(f"{run.pathspec}: finished={run.finished} successful={run.successful}")

    # 1. Artifacts. Every task that ran after a billable step carries the ledger so
    #    far; the end step's is the whole run's. `pf_escrows` maps step (or
    #    step[shard]) to escrow id. Plain dicts and strings: reading them needs
    #    only Metaflow, not pf_metaflow.
    if run.successful:
        print("escrow ids (the pf_escrows artifact):")
        for key, escrow_id in run.data.pf_escrows.items():
            print(f"  {key:<12} {escrow_id}")

    # 2. Everything, including tasks that died before saving artifacts: every state
    #    of every escrow is also written to its task's metadata. `ledger_of` merges
    #    both, so it also works on failed and killed runs.
    entries = ledger_of(run)
    print("ledger (artifacts and task metadata):")
    for e in entries:
        print(f"  {e['shard'] or e['step']:<12} {e['status']:<9} {e['amount_usdc']:>12} USDC  "
              f"fee {e['fee_usdc']}  net {e['net_usdc']}  {e['escrow_id']}  "
              f"{run.pathspec}/{e['step']}/{e['task']} attempt {e['attempt']}")
        if e["status"] != "released" and e["reason"]:
            print(f"  {'':<12} reason: {e['reason']}")

    t = totals(entries)
    print(f"paid {t['released']} USDC ({t['net_paid']} to agents, {t['fees']} in fees), "
          f"refunded {t['refunded']} USDC, still open {t['locked'] + t['refund_pending'] + t['unknown']} USDC")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
