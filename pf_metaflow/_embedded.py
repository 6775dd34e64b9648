"""The embedded transport: the sandbox engine in-process, with the HTTP sandbox's answers.

The default when ``PF_ESCROW_URL`` is unset (or ``sandbox:`` / ``sandbox:///path.db``):
no server, no network, no key needed (none pays as ``ag_sandbox_payer``). Every Metaflow
task is its own process, so all state lives in the database file. Neither requests nor
tenacity is imported on this path.
"""

from __future__ import annotations

import threading
from decimal import Decimal
from pathlib import Path
from typing import Any, Optional

from .answers import Capabilities
from .errors import AuthenticationError, ConfigurationError
from .ids import SANDBOX_PAYER

SANDBOX_CAPABILITIES = Capabilities(
    sandbox=True, extensions=frozenset({"refund", "idempotency", "faucet", "balance"})
)


def _engine_class():
    # Imported on first use: the HTTP client needs neither sqlite3 nor the engine.
    from .sandbox.engine import SandboxEngine

    return SandboxEngine


def is_sandbox_url(url: str) -> bool:
    """True for the URLs of the embedded sandbox: empty, ``sandbox:`` or ``sandbox:///path``."""
    return not url or url.lower().startswith("sandbox:")


def sandbox_path(url: str) -> Path:
    """The database file of a sandbox URL (``sandbox:`` alone: ``$PF_SANDBOX_DB`` or the default)."""
    rest = url[len("sandbox:"):] if url else ""
    if rest.startswith("//"):
        netloc, _, path = rest[2:].partition("/")
        if netloc:
            raise ConfigurationError(
                "PF_ESCROW_URL sandbox form is sandbox: or sandbox:///absolute/path/escrow.db"
            )
        rest = "/" + path if path else ""
    if not rest:
        return Path(_engine_class().default_path())
    return Path(rest).expanduser().absolute()


class EmbeddedTransport:
    """Calls the engine directly; answers are the same JSON objects the HTTP sandbox sends."""

    def __init__(self, path: Path, key: Optional[str]) -> None:
        self.path = path
        self._key = key
        self._engine: Any = None
        self._agent: Optional[str] = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"EmbeddedTransport({str(self.path)!r})"

    def _open(self) -> tuple[Any, str]:
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    engine = _engine_class()(self.path)
                    agent = SANDBOX_PAYER if self._key is None else engine.agent_for_key(self._key)
                    if agent is None:
                        raise AuthenticationError(
                            "the embedded sandbox does not know this API key (PF_ESCROW_URL is "
                            "unset, so pf-metaflow uses the sandbox). Unset PF_API_KEY to pay as "
                            "ag_sandbox_payer, or set PF_ESCROW_URL=https://escrow.purpleflea.com "
                            "to use the live service",
                            status=401,
                        )
                    self._agent = agent
                    self._engine = engine
        return self._engine, self._agent  # type: ignore[return-value]

    def agent_id(self) -> Optional[str]:
        """The agent this client pays as (the engine knows every key)."""
        return self._open()[1]

    def create(
        self,
        amount: Decimal,
        description: str,
        counterparty: str,
        timeout_hours: Optional[int],
        referral_code: Optional[str],
        idempotency_key: Optional[str],
    ) -> tuple[dict, bool]:
        engine, agent = self._open()
        record, replayed = engine.create(
            agent,
            amount_usd=amount,
            description=description,
            counterparty_agent_id=counterparty,
            timeout_hours=24 if timeout_hours is None else timeout_hours,
            referral_code=referral_code,
            idempotency_key=idempotency_key,
        )
        return record, bool(replayed)

    def release(self, escrow_id: str) -> dict:
        engine, agent = self._open()
        return engine.release(agent, escrow_id)

    def refund(self, escrow_id: str) -> dict:
        engine, agent = self._open()
        return engine.refund(agent, escrow_id)

    def get(self, escrow_id: str) -> dict:
        engine, _ = self._open()
        return engine.get(escrow_id)

    def capabilities(self) -> Capabilities:
        return SANDBOX_CAPABILITIES

    def balance(self) -> dict:
        engine, agent = self._open()
        return engine.balance(agent)
