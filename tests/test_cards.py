"""Every shipped flow's end step has a ledger card, and ``--with card:type=pf_ledger`` gives one
to a flow that never imports pf_metaflow. Real runs on the embedded sandbox."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from mfrun import REPO, Workspace
from payments import ran


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Runs in the page once the card has rendered; the verdict goes to the title, read from --dump-dom.
PROBE = """<script>setTimeout(function () {
  var page = document.documentElement, ours = [];
  document.querySelectorAll('table').forEach(function (t) {
    if (/esc_|released \\(paid\\)/.test(t.innerText)) ours.push(Math.ceil(t.getBoundingClientRect().right));
  });
  document.title = 'PROBE' + JSON.stringify({scroll: page.scrollWidth, client: page.clientWidth,
    ours: ours, text: document.body.innerText});
}, 2000);</script>"""


def assert_fits_1200_px(ws: Workspace, task, ledger: dict) -> None:
    """Debian's chromium, headless, 1200 px wide: no horizontal overflow, our tables inside the
    window, the totals and every escrow visible."""
    from metaflow.cards import get_cards

    html = get_cards(task)[0].get()
    cut = html.rindex("</body>")
    page = ws.path / "card.html"
    page.write_text(html[:cut] + PROBE + html[cut:])
    dom = subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,900",
                          "--virtual-time-budget=6000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    found = json.loads(__import__("html").unescape(re.search(r"<title>PROBE(.*?)</title>", dom, re.S).group(1)))
    assert found["scroll"] <= found["client"], found["scroll"]
    assert len(found["ours"]) >= 2 and max(found["ours"]) <= found["client"], found["ours"]
    assert f"released (paid)\t{ledger['totals']['released']} USDC" in found["text"]
    for entry in ledger["entries"]:
        assert (entry["escrow_id"] or entry["status"]) in found["text"]


def card_payloads(task) -> list[str]:
    from metaflow.cards import get_cards

    out = []
    for card in get_cards(task):
        html = card.get()
        payload = re.search(r'__MF_DATA__\[[^\]]*\] = "([^"]*)"', html).group(1)
        out.append(json.dumps(json.loads(base64.b64decode(payload))))
    return out


@pytest.mark.parametrize("flow, args, result", [
    pytest.param("training_bounty.py", ["--min_accuracy", "0.99"], "RESULT: FAILED: paid work did not succeed in train",
                 marks=pytest.mark.slow),
    pytest.param("data_ingest.py", [], "RESULT: OK: all paid work succeeded and was paid", marks=pytest.mark.slow),
    ("batch_shards.py", ["--num_shards", "3", "--fail_shards", "1"], "RESULT: FAILED"),
    pytest.param("ml_pipeline_with_payments.py", ["--fail_at", "deploy"],
                 "RESULT: FAILED: paid work did not succeed in deploy", marks=pytest.mark.slow),
])
def test_each_flow_ends_with_a_ledger_card_showing_every_escrow_the_totals_and_the_outcome(ws, flow, args, result):
    run = ran(ws, flow, *args)
    ledger = ws.ledger(run.pathspec)
    [card] = card_payloads(ws.client_run(run.pathspec)["end"].task)
    assert "Purple Flea payments" in card and result in card
    for entry in ledger["entries"]:
        assert (entry["escrow_id"] or entry["status"]) in card
    assert f'["released (paid)", "{ledger["totals"]["released"]} USDC"]' in card
    assert f'["refunded", "{ledger["totals"]["refunded"]} USDC"]' in card
    if CHROMIUM:
        assert_fits_1200_px(ws, ws.client_run(run.pathspec)["end"].task, ledger)


def test_the_card_type_shows_the_ledger_of_a_flow_that_never_imports_pf_metaflow(ws):
    run = ws.run_flow(REPO / "examples" / "existing_flow.py",
                      "--with", "pf_escrow_step:agent_wallet=ag_sandbox_worker,amount_usdc=0.50,steps=summarize",
                      "--with", "card:type=pf_ledger")
    assert run.returncode == 0, run.output
    client_run = ws.client_run(run.pathspec)
    [card] = card_payloads(client_run["end"].task)
    [entry] = ws.ledger(run.pathspec)["entries"]
    assert entry["escrow_id"] in card and '["released (paid)", "0.500000 USDC"]' in card
    [before] = card_payloads(client_run["start"].task)
    assert "has no `pf_ledger` artifact" in before
