"""The client's modules depend one way, and the embedded sandbox stays light.

answers (what answers mean) <- _http, _embedded (transports) <- client; retries (the
policy) <- client. Nothing below the client imports it, so nothing points back up.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import pf_metaflow

PACKAGE = Path(pf_metaflow.__file__).parent
BELOW_THE_CLIENT = ["answers", "_http", "_embedded", "retries", "errors", "ids", "money"]


def imported_modules(module: str) -> set[str]:
    """Every pf_metaflow module ``module`` imports, at the top or inside a function."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                found.add((node.module or "").split(".")[0])
                found.update(alias.name for alias in node.names if not node.module)
            elif (node.module or "").startswith("pf_metaflow"):
                found.add(node.module.split(".")[1] if "." in node.module else "")
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("pf_metaflow."))
    return found


@pytest.mark.parametrize("module", BELOW_THE_CLIENT)
def test_nothing_below_the_client_imports_it(module):
    assert "client" not in imported_modules(module)


def test_transports_do_not_import_each_other_or_the_policy():
    assert not imported_modules("_http") & {"_embedded", "retries"}
    assert not imported_modules("_embedded") & {"_http", "retries"}


def test_answers_depends_only_on_values():
    assert imported_modules("answers") <= {"errors", "ids", "money"}


def test_the_embedded_sandbox_never_loads_requests_urllib3_or_tenacity(tmp_path):
    code = f"""
import sys
from pf_metaflow.client import EscrowClient
from pf_metaflow.api import pf_create, pf_refund, pf_release
client = EscrowClient("sandbox://{tmp_path / 'light.db'}")
escrow = pf_create("ag_sandbox_worker", "1.00", "stays light", client=client, idempotency_key="k")
pf_release(escrow, client=client)
pf_refund(pf_create("ag_sandbox_worker", "1.00", "comes back", client=client), client=client)
assert client.is_sandbox and client.balance()["agent_id"] == "ag_sandbox_payer"
loaded = sorted(m for m in ("requests", "urllib3", "tenacity") if m in sys.modules)
print(",".join(loaded) or "none")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "none"
