"""The API key never appears in anything a run leaves behind (docs/design.md, settlement rules).

A flow pays through ``pf-metaflow sandbox serve`` with a freshly registered agent's
key: one step is paid, one fails under ``@catch`` (an exception object is stored as
an artifact and its text goes into the ledger), one is refused escrow (insufficient
funds, also under ``@catch``), and the end step renders the ledger card. HTTP debug
logging is on, so every request the client makes is logged.

Then everything is searched for the key: every file under the run's directory
(the ``.metaflow`` datastore: gzip'd pickled artifacts, decompressed; task metadata
JSON; task logs; card HTML; the sandbox database), the run's captured stdout and
stderr, and what ``pf-metaflow ledger`` and ``reconcile`` print. Also searched: the
key's random part alone, and its base64 and URL-encoded forms (card HTML embeds
its data base64-encoded). Positive controls prove each kind of file was read:
the paid escrow's id is found in the decompressed artifacts, metadata, logs and card.
"""

from __future__ import annotations

import base64
import gzip
import json
import zlib
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
from conftest import running_sandbox_server
from mfrun import Workspace, write_flow

FLOW = '''
import logging

from metaflow import FlowSpec, card, catch, current, step

from pf_metaflow import ledger_card, pf_escrow_step, pf_get

# Every request the escrow client makes is logged (urllib3, tenacity, pf_metaflow).
logging.basicConfig(level=logging.DEBUG)


class KeyHygieneFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.work)

    @pf_escrow_step(agent_wallet="ag_sandbox_worker", amount_usdc="1.50", label="good work")
    @step
    def work(self):
        print("work done")
        self.next(self.broken)

    @catch(var="broken_error")
    @pf_escrow_step(agent_wallet="ag_sandbox_worker", amount_usdc="0.75", label="bad work")
    @step
    def broken(self):
        pf_get("esc_doesnotexist0")  # the server says 404; the client's error leaves the step
        self.next(self.too_dear)

    @catch(var="too_dear_error")
    @pf_escrow_step(agent_wallet="ag_sandbox_worker", amount_usdc="1000", label="too dear")
    @step
    def too_dear(self):
        self.next(self.end)

    @card(type="blank")
    @step
    def end(self):
        for component in ledger_card(self.pf_ledger):
            current.card.append(component)


if __name__ == "__main__":
    KeyHygieneFlow()
'''


def encoded_forms(secret: str) -> set[bytes]:
    """``secret`` as it could appear inside larger text: raw, URL-encoded, and base64 at
    each of the three byte alignments (standard and URL-safe alphabets)."""
    raw = secret.encode()
    forms = {raw, quote(secret, safe="").encode(), quote_plus(secret).encode()}
    for prefix in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode(b"\0" * prefix + raw)
            # Drop the 4-char groups that mix in neighbouring bytes; the middle is fixed.
            forms.add(text[4 if prefix else 0: -4])
    return forms


def decoded(data: bytes) -> bytes:
    """The file's bytes, with any gzip / zlib layers (Metaflow artifacts) undone."""
    for _ in range(3):
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        elif data[:1] == b"\x78":
            try:
                data = zlib.decompress(data)
            except zlib.error:
                break
        else:
            break
    return data


def corpus(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): decoded(p.read_bytes()) for p in root.rglob("*") if p.is_file()}


def found(needles: set[bytes], haystack: bytes) -> bool:
    return any(n in haystack for n in needles)


@pytest.fixture(scope="module")
def key_run(tmp_path_factory: pytest.TempPathFactory):
    """One run (and the CLI after it) for every test here: (agent, run, root, printed, ws)."""
    root = tmp_path_factory.mktemp("key_hygiene")
    with running_sandbox_server(root / "sandbox" / "escrow.db") as server:
        ws = Workspace(root / "run_dir")
        ws.path.mkdir()
        sandbox = ["--db", str(server.db)]
        registered = ws.cli("sandbox", "register", "hygiene tester", "--json", *sandbox)
        assert registered.returncode == 0, registered.stderr
        agent = json.loads(registered.stdout)
        claimed = ws.cli("sandbox", "faucet", agent["agent_id"], "--amount", "100", *sandbox)
        assert claimed.returncode == 0, claimed.stderr
        env = {"PF_ESCROW_URL": server.url, "PF_API_KEY": agent["api_key"]}
        run = ws.run_flow(write_flow(ws.path, "key_hygiene_flow.py", FLOW), env=env)
        assert run.returncode == 0, run.output
        printed = [run.stdout, run.stderr]
        for command in (["ledger", run.pathspec], ["ledger", run.pathspec, "--json"],
                        ["reconcile", run.pathspec]):
            proc = ws.cli(*command, env=env)
            assert proc.returncode == 0, proc.stderr
            printed += [proc.stdout, proc.stderr]
    return agent, run, root, "\n".join(printed).encode(), ws


def test_the_key_appears_nowhere_a_run_leaves_anything(key_run):
    agent, run, root, printed, ws = key_run
    key = agent["api_key"]
    needles = encoded_forms(key) | encoded_forms(key.removeprefix("pf_sandbox_"))
    files = corpus(root)
    hits = sorted(name for name, data in files.items() if found(needles, data))
    assert hits == [], f"the API key is in {hits}"
    assert not found(needles, printed), "the API key is in the run's or the CLI's output"


def test_the_search_really_read_artifacts_metadata_logs_and_cards(key_run):
    """Positive controls: the paid escrow's id is in each kind of file searched."""
    agent, run, root, printed, ws = key_run
    ledger = ws.ledger(run.pathspec)
    by_label = {e["label"]: e for e in ledger["entries"]}
    assert by_label["good work"]["status"] == "released"
    assert by_label["bad work"]["status"] == "refunded"
    assert by_label["too dear"]["status"] == "not_created"  # refused: no escrow, unpaid work shown
    assert by_label["too dear"]["escrow_id"] is None
    escrow_id = by_label["good work"]["escrow_id"]
    ids = encoded_forms(escrow_id)
    files = corpus(root)
    datastore = {n: d for n, d in files.items() if n.startswith("run_dir/.metaflow/")}
    artifacts = [n for n, d in datastore.items() if "/data/" in n and d.startswith(b"\x80")]
    assert any(found(ids, datastore[n]) for n in artifacts), "no artifact decompressed"
    metadata = [n for n in datastore if n.endswith(".json") and "_meta" in n]
    assert any(found(ids, datastore[n]) for n in metadata), "no task metadata read"
    logs = [n for n in datastore if n.endswith(".log")]
    assert any(b"[pf-metaflow] escrow " + escrow_id.encode() in datastore[n] for n in logs), "no log read"
    assert any(b"POST /escrow/create" in datastore[n] for n in logs), "HTTP debug logging was off"
    cards = [n for n in datastore if n.endswith(".html")]
    assert cards and any(found(ids, datastore[n]) for n in cards), "no card read"
    errors = [n for n in artifacts if b"esc_doesnotexist0" in datastore[n]]
    assert errors, "the caught exception was not among the artifacts"
    assert any(b"could not lock 1000.000000 USDC" in datastore[n] for n in artifacts)
    assert escrow_id.encode() in printed
