"""The sandbox escrow engine: Purple Flea's escrow rules on one SQLite file.

Every Metaflow task is its own process, so all state lives in the database file and
every operation is one short ``BEGIN IMMEDIATE`` transaction (WAL mode, a long busy
timeout): many processes can share one file without ever seeing "database is locked".

Amounts are stored as integer micro-USDC (exact) and handed out as 6-place
:class:`~decimal.Decimal`. The rules are the live service's (statuses, who may do what,
the 1% fee and its 15% referral share, validation order and error codes), plus the
sandbox extensions: a full refund, idempotency keys on create, a faucet and balances.
Conservation holds at every commit and :meth:`SandboxEngine.check_invariant` proves it::

    minted == sum(agent balances) + locked in open escrows + house fees
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Iterator, Optional

from ..errors import (
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAgentId,
    InvalidAmount,
    InvalidRequest,
    InvalidStatus,
    NotFound,
    PermissionDenied,
    PurpleFleaError,
    ServiceUnavailable,
)
from ..ids import SANDBOX_PAYER, SANDBOX_WORKER, check_agent_id, check_description
from ..money import USDC_QUANTUM, AmountLike, fee_for, parse_usdc, usdc_str

# Fixed, documented keys of the built-in agents. Not secrets: they only open a local
# sandbox file, and tests and examples need to know them.
PAYER_KEY = "pf_sandbox_payer_key"
WORKER_KEY = "pf_sandbox_worker_key"
PAYER_START_USDC = Decimal("1000000.000000")
FAUCET_DEFAULT_USDC = Decimal("100.000000")
FAUCET_MAX_USDC = Decimal("1000000.000000")
DEFAULT_TIMEOUT_HOURS = 24
MAX_TIMEOUT_HOURS = 720
MAX_IDEMPOTENCY_KEY = 255
BUSY_TIMEOUT_S = 60.0
SCHEMA_VERSION = 1

OPEN_STATUSES = ("funded", "completed", "disputed")  # money still locked
SETTLEABLE = ("funded", "completed")  # may be released, refunded or time out

_ESCROW_COLUMNS = (
    "escrow_id, status, amount, commission, description, creator_id, counterparty_id, "
    "timeout_hours, created_ms, auto_release_ms, completed_ms, released_ms, disputed_ms, "
    "refunded_ms, referral_commission, referrer_id"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    agent_id      TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    key_hash      TEXT UNIQUE,
    referral_code TEXT UNIQUE,
    usdc          INTEGER NOT NULL DEFAULT 0 CHECK (usdc >= 0),
    locked        INTEGER NOT NULL DEFAULT 0 CHECK (locked >= 0),
    created_ms    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS escrows (
    escrow_id           TEXT PRIMARY KEY,
    status              TEXT NOT NULL,
    amount              INTEGER NOT NULL CHECK (amount > 0),
    commission          INTEGER NOT NULL,
    description         TEXT NOT NULL,
    creator_id          TEXT NOT NULL,
    counterparty_id     TEXT NOT NULL,
    timeout_hours       INTEGER NOT NULL,
    created_ms          INTEGER NOT NULL,
    auto_release_ms     INTEGER NOT NULL,
    completed_ms        INTEGER,
    released_ms         INTEGER,
    disputed_ms         INTEGER,
    refunded_ms         INTEGER,
    referral_commission INTEGER NOT NULL DEFAULT 0,
    referrer_id         TEXT,
    dispute_reason      TEXT,
    refund_kind         TEXT
);
CREATE INDEX IF NOT EXISTS escrows_by_creator ON escrows (creator_id);
CREATE INDEX IF NOT EXISTS escrows_due ON escrows (auto_release_ms)
    WHERE status IN ('funded', 'completed');
CREATE TABLE IF NOT EXISTS idempotency (
    creator_id TEXT NOT NULL,
    key        TEXT NOT NULL,
    body_hash  TEXT NOT NULL,
    escrow_id  TEXT NOT NULL,
    response   TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (creator_id, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS totals (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    schema_version INTEGER NOT NULL,
    minted         INTEGER NOT NULL,
    house_fees     INTEGER NOT NULL
);
"""

# Connections a forked child inherited. Never closed in the child: closing one could
# checkpoint or unlink the WAL under the parent's feet. Kept referenced so the garbage
# collector does not close them either.
_INHERITED: list = []

# Idle connections this process holds open (hold_open), by database file.
_HELD: dict = {}


def hold_open(path: str | os.PathLike) -> bool:
    """Keep one idle connection to an existing sandbox database open in this process, until
    :func:`release_held`: for a process that starts many short-lived processes using the
    file (Metaflow's runtime: every task is a process of its own). True if one is held.

    The last connection to a WAL database to close checkpoints the log into the database
    file (syncing both to disk: two fsyncs) and deletes it, and the next process to open the
    file makes the log and its shared memory again; without a holder, every paid task did
    both. With one, the log lives as long as the holder, and SQLite checkpoints it the way
    it does under the long-lived HTTP sandbox server: every 1,000 pages (``PRAGMA
    wal_autocheckpoint``), and once more when the holder closes. What a commit guarantees is
    what ``synchronous = NORMAL`` promises either way (see ``SandboxEngine._open``): it
    survives a killed process, only a power cut can lose the last commits. Crash safety for
    many processes is untouched: the holder reads nothing and holds no transaction, so it
    blocks no writer and no checkpoint. It never creates a database (False when there is
    none yet: the first task makes it, later tasks benefit).
    """
    key = str(pathlib.Path(path).absolute())
    if key in _HELD:
        return True
    if not os.path.isfile(key):
        return False
    conn = sqlite3.connect(key, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    try:
        # One statement joins the WAL (its shared memory); autocommit ends the read at once.
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.Error:
        conn.close()
        return False
    _HELD[key] = conn
    return True


def release_held() -> None:
    """Close the connections :func:`hold_open` holds (the last one out checkpoints the log)."""
    while _HELD:
        _, conn = _HELD.popitem()
        conn.close()


def _forget_held_in_child() -> None:
    # A forked child must never close the parent's held connections (see _INHERITED).
    _INHERITED.extend(_HELD.values())
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_held_in_child)


def _micro(amount: Decimal) -> int:
    return int(amount.scaleb(6))


def _usdc(micro: int) -> Decimal:
    return Decimal(micro).scaleb(-6).quantize(USDC_QUANTUM)


def _iso(ms: Optional[int]) -> Optional[str]:
    """Epoch milliseconds as the live service writes times: 2025-01-31T12:00:00.000Z."""
    if ms is None:
        return None
    seconds, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text


def _key_hash(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


# Hours given as text: plain ASCII decimals, as the live protocol's numbers.
_PLAIN_NUMBER = re.compile(r"-?[0-9]{1,30}(?:\.[0-9]{1,30})?", re.ASCII)


def _plain_amount(value: AmountLike, name: str) -> AmountLike:
    """``value``, refusing text with what Decimal() takes beyond ASCII numbers: other
    scripts' digits ("١٠", "１０") and underscores ("1_0"). NaN, inf and exponents go on to
    parse_usdc, which says what is wrong with them."""
    if isinstance(value, str) and (not value.isascii() or "_" in value):
        shown = repr(value) if len(value) <= 40 else f"a text of {len(value)} characters"
        raise InvalidAmount(f"{name} is not a number: expected plain ASCII digits such as "
                            f"12.5, got {shown}")
    return value


def _timeout_hours(value: object) -> int:
    """Whole hours, clamped to 1..720 as the live service does (it floors and clamps)."""
    if value is None:
        return DEFAULT_TIMEOUT_HOURS
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal, str)):
        raise InvalidRequest(
            "timeout_hours must be a whole number of hours", code="invalid_timeout"
        )
    if isinstance(value, int):
        hours = value
    else:
        try:
            if isinstance(value, str) and not _PLAIN_NUMBER.fullmatch(value.strip()):
                raise InvalidOperation  # only plain ASCII decimals: not "1_0", "١٠", "1e9"
            number = Decimal(repr(value) if isinstance(value, float) else str(value).strip())
        except InvalidOperation:
            number = Decimal("NaN")
        if not number.is_finite():
            raise InvalidRequest(
                "timeout_hours must be a whole number of hours", code="invalid_timeout"
            )
        # Clamp before converting: int() of 1e1000000 costs time that grows with the
        # exponent (the square of it), and a request must not buy that.
        if number >= MAX_TIMEOUT_HOURS:
            return MAX_TIMEOUT_HOURS
        if number < 1:
            return 1
        hours = int(number.to_integral_value(rounding="ROUND_FLOOR"))
    return min(max(1, hours), MAX_TIMEOUT_HOURS)


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:24].strip("_")
    return slug or "agent"


class SandboxEngine:
    """The sandbox escrow on a SQLite file, safe to share between processes and threads.

    Parameters
    ----------
    path
        The database file; its directory and schema are created on first use.
    clock
        Seconds since the epoch (default :func:`time.time`); tests pass a fake one to
        make escrows time out.
    """

    def __init__(
        self, path: str | os.PathLike, *, clock: Optional[Callable[[], float]] = None
    ) -> None:
        self.path = pathlib.Path(path)
        self._clock = clock or time.time
        self._conn: Optional[sqlite3.Connection] = None
        self._pid = os.getpid()
        # One connection per engine per process; the threaded HTTP server shares it
        # under this lock (SQLite serialises writers anyway).
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"SandboxEngine({str(self.path)!r})"

    @staticmethod
    def default_path() -> pathlib.Path:
        """``$PF_SANDBOX_DB`` if set, else ``./.pf_sandbox/escrow.db``."""
        env = os.environ.get("PF_SANDBOX_DB")
        if env:
            return pathlib.Path(env)
        return pathlib.Path.cwd() / ".pf_sandbox" / "escrow.db"

    # -- connection and transactions ------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            str(self.path),
            timeout=BUSY_TIMEOUT_S,  # SQLite's busy timeout: a locked database is waited for
            isolation_level=None,  # we issue BEGIN IMMEDIATE / COMMIT ourselves
            check_same_thread=False,
        )
        self._set_wal(conn)
        # WAL + NORMAL: a commit survives a killed process (what tasks do); only a power
        # cut can lose the last commits, which a local sandbox can afford.
        conn.execute("PRAGMA synchronous = NORMAL")
        self._ensure_schema(conn)
        return conn

    @staticmethod
    def _set_wal(conn: sqlite3.Connection) -> None:
        # Switching a fresh file to WAL needs a moment of exclusive access; when many
        # processes open a new file at once, some are told "locked": wait and retry.
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL").fetchone()
                return
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        try:
            row = conn.execute("SELECT schema_version FROM totals WHERE id = 1").fetchone()
        except sqlite3.OperationalError:
            row = None
        if row is not None:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            if conn.execute("SELECT 1 FROM totals WHERE id = 1").fetchone() is None:
                now = self._now_ms()
                start = _micro(PAYER_START_USDC)
                conn.executemany(
                    "INSERT INTO agents (agent_id, name, key_hash, referral_code, usdc, "
                    "created_ms) VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (SANDBOX_PAYER, "sandbox payer", _key_hash(PAYER_KEY),
                         "ref_sandbox_payer", start, now),
                        (SANDBOX_WORKER, "sandbox worker", _key_hash(WORKER_KEY),
                         "ref_sandbox_worker", 0, now),
                    ],
                )
                conn.execute(
                    "INSERT INTO totals (id, schema_version, minted, house_fees) "
                    "VALUES (1, ?, ?, 0)",
                    (SCHEMA_VERSION, start),
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _connection(self) -> sqlite3.Connection:
        conn = self._conn
        if conn is None:
            conn = self._conn = self._open()
        return conn

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            # A forked child: the parent's connection and lock are not ours to use.
            if self._conn is not None:
                _INHERITED.append(self._conn)
            self._conn = None
            self._lock = threading.RLock()
            self._pid = os.getpid()

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One short transaction. Refusals (PurpleFleaError) still commit: the only
        writes made before an operation refuses are lazy timeout refunds, which must stick.

        ``BEGIN IMMEDIATE`` takes the write lock up front, so a busy database can only
        refuse us there, before anything happened: that becomes ServiceUnavailable (safe
        to retry) instead of a raw sqlite3 error.
        """
        self._check_fork()
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield conn
                except PurpleFleaError:
                    self._commit(conn)
                    raise
                self._commit(conn)
            except PurpleFleaError:
                raise
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError) and _is_busy(exc):
                    raise ServiceUnavailable(
                        f"the sandbox database {self.path} stayed locked for "
                        f"{BUSY_TIMEOUT_S:g}s; nothing was changed, try again",
                        details={"retry_after": 1},
                    ) from exc
                raise

    @staticmethod
    def _commit(conn: sqlite3.Connection) -> None:
        try:
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close this process's connection (it reopens on next use)."""
        self._check_fork()
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- escrow lifecycle ----------------------------------------------------------

    def create(
        self,
        creator_id: str,
        *,
        amount_usd: AmountLike,
        description: str,
        counterparty_agent_id: str,
        timeout_hours: Optional[int] = DEFAULT_TIMEOUT_HOURS,
        referral_code: Optional[str] = None,
        idempotency_key: Optional[str] = None,
    ) -> tuple[dict, bool]:
        """Lock ``amount_usd`` of the creator's balance in a new escrow.

        Returns ``(record, replayed)``: the escrow as :meth:`get` shows it, and whether
        it is the stored first answer to an earlier create with the same idempotency key
        and the same request (no money moved this time).
        """
        if amount_usd is None:
            raise InvalidAmount("amount_usd is required")
        amount = parse_usdc(_plain_amount(amount_usd, "amount_usd"), name="amount_usd")
        if isinstance(description, str):
            description = description.strip()
        description = check_description(description)
        if isinstance(counterparty_agent_id, str):
            counterparty_agent_id = counterparty_agent_id.strip()
        counterparty = check_agent_id(counterparty_agent_id, name="counterparty_agent_id")
        if counterparty == creator_id:
            raise InvalidAgentId("cannot create an escrow with yourself", code="self_escrow")
        hours = _timeout_hours(timeout_hours)
        if referral_code is not None and not isinstance(referral_code, str):
            raise InvalidRequest(
                f"referral_code must be text, got {referral_code!r}", code="invalid_referral_code"
            )
        referral_code = referral_code.strip() if referral_code else None
        body_hash = None
        if idempotency_key is not None:
            if (
                not isinstance(idempotency_key, str)
                or not idempotency_key.strip()
                or len(idempotency_key) > MAX_IDEMPOTENCY_KEY
            ):
                raise InvalidRequest(
                    f"Idempotency-Key must be 1..{MAX_IDEMPOTENCY_KEY} characters",
                    code="invalid_idempotency_key",
                )
            canonical = json.dumps(
                [usdc_str(amount), description, counterparty, hours, referral_code or ""]
            )
            body_hash = hashlib.sha256(canonical.encode("utf-8")).hexdigest()

        micro = _micro(amount)
        with self._tx() as conn:
            if body_hash is not None:
                stored = conn.execute(
                    "SELECT body_hash, response FROM idempotency WHERE creator_id = ? AND key = ?",
                    (creator_id, idempotency_key),
                ).fetchone()
                if stored is not None:
                    if stored[0] != body_hash:
                        raise IdempotencyConflict(
                            "this Idempotency-Key was already used for a different create request",
                            details={"idempotency_key": idempotency_key},
                        )
                    return _record_from_json(stored[1]), True
            # Both agents in one read: the counterparty must exist, the creator's balance counts.
            balances = dict(conn.execute(
                "SELECT agent_id, usdc FROM agents WHERE agent_id IN (?, ?)", (counterparty, creator_id)
            ).fetchall())
            if counterparty not in balances:
                raise NotFound(
                    f"counterparty agent {counterparty} not found", code="counterparty_not_found"
                )
            if creator_id not in balances:
                raise NotFound(f"creator agent {creator_id} not found", code="creator_not_found")
            balance = balances[creator_id]
            if balance < micro:
                # Escrows of this creator that timed out give money back when touched.
                self._expire_due(conn, creator_id=creator_id)
                balance = conn.execute(
                    "SELECT usdc FROM agents WHERE agent_id = ?", (creator_id,)
                ).fetchone()[0]
            if balance < micro:
                raise InsufficientFunds(
                    f"balance {usdc_str(_usdc(balance))} USDC < escrow amount "
                    f"{usdc_str(amount)} USDC",
                    details={"balance": usdc_str(_usdc(balance))},
                )
            referrer = None
            if referral_code:
                found = conn.execute(
                    "SELECT agent_id FROM agents WHERE referral_code = ?", (referral_code,)
                ).fetchone()
                # An unknown code, or one's own, earns nobody a share (as live).
                if found is not None and found[0] != creator_id:
                    referrer = found[0]
            fee = fee_for(amount, referred=referrer is not None)
            now = self._now_ms()
            due = now + hours * 3_600_000
            escrow_id = "esc_" + secrets.token_hex(8)
            conn.execute(
                "UPDATE agents SET usdc = usdc - ?, locked = locked + ? WHERE agent_id = ?",
                (micro, micro, creator_id),
            )
            conn.execute(
                "INSERT INTO escrows (escrow_id, status, amount, commission, description, "
                "creator_id, counterparty_id, timeout_hours, created_ms, auto_release_ms, "
                "referral_commission, referrer_id) "
                "VALUES (?, 'funded', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (escrow_id, micro, _micro(fee.commission), description, creator_id,
                 counterparty, hours, now, due, _micro(fee.referral), referrer),
            )
            record = {
                "escrow_id": escrow_id,
                "status": "funded",
                "amount_usd": amount,
                "commission_usd": fee.commission,
                "net_to_counterparty": fee.net,
                "description": description,
                "creator_id": creator_id,
                "counterparty_id": counterparty,
                "timeout_hours": hours,
                "created_at": _iso(now),
                "auto_release_at": _iso(due),
                "completed_at": None,
                "released_at": None,
                "disputed_at": None,
                "refunded_at": None,
            }
            if body_hash is not None:
                conn.execute(
                    "INSERT INTO idempotency (creator_id, key, body_hash, escrow_id, response, "
                    "created_ms) VALUES (?, ?, ?, ?, ?, ?)",
                    (creator_id, idempotency_key, body_hash, escrow_id,
                     json.dumps(record, default=usdc_str), now),
                )
        return record, False

    def release(self, caller_id: str, escrow_id: str) -> dict:
        """Pay the counterparty (amount - 1%); the fee goes to the house and the referrer."""
        with self._tx() as conn:
            row = self._settleable(conn, caller_id, escrow_id, "release")
            amount, commission, ref_share, referrer = row[2], row[3], row[14], row[15]
            net = amount - commission
            now = self._now_ms()
            conn.execute(
                "UPDATE escrows SET status = 'released', released_ms = ? WHERE escrow_id = ?",
                (now, escrow_id),
            )
            conn.execute(
                "UPDATE agents SET locked = locked - ? WHERE agent_id = ?", (amount, row[5])
            )
            self._pay_out(conn, row[6], net, commission, ref_share, referrer)
        return {
            "escrow_id": escrow_id,
            "status": "released",
            "amount_released": _usdc(net),
            "commission": _usdc(commission),
            "referral_commission": _usdc(ref_share if referrer else 0),
            "counterparty_id": row[6],
        }

    def refund(self, caller_id: str, escrow_id: str) -> dict:
        """Sandbox extension: give the creator the full amount back, no commission."""
        with self._tx() as conn:
            row = self._settleable(conn, caller_id, escrow_id, "refund")
            amount = row[2]
            conn.execute(
                "UPDATE escrows SET status = 'refunded', refunded_ms = ?, refund_kind = 'full' "
                "WHERE escrow_id = ?",
                (self._now_ms(), escrow_id),
            )
            conn.execute(
                "UPDATE agents SET usdc = usdc + ?, locked = locked - ? WHERE agent_id = ?",
                (amount, amount, row[5]),
            )
        return {
            "escrow_id": escrow_id,
            "status": "refunded",
            "amount_refunded": _usdc(amount),
            "creator_id": row[5],
        }

    def complete(self, caller_id: str, escrow_id: str) -> dict:
        """The counterparty marks the work done (funded -> completed)."""
        with self._tx() as conn:
            row = self._escrow_row(conn, escrow_id, expire=True)
            if row[6] != caller_id:
                raise PermissionDenied("only the counterparty can mark the task complete")
            if row[1] != "funded":
                raise InvalidStatus(f"cannot complete escrow in status '{row[1]}'")
            conn.execute(
                "UPDATE escrows SET status = 'completed', completed_ms = ? WHERE escrow_id = ?",
                (self._now_ms(), escrow_id),
            )
        return {"escrow_id": escrow_id, "status": "completed", "auto_release_at": _iso(row[9])}

    def dispute(self, caller_id: str, escrow_id: str, reason: Optional[str] = None) -> dict:
        """Either party flags the escrow; its funds stay locked until a person reviews it."""
        if reason is not None and not isinstance(reason, str):
            raise InvalidRequest(f"reason must be text, got {reason!r}", code="invalid_reason")
        reason = (reason or "").strip() or "No reason provided"
        with self._tx() as conn:
            row = self._escrow_row(conn, escrow_id, expire=True)
            if caller_id not in (row[5], row[6]):
                raise PermissionDenied("only escrow participants can dispute")
            if row[1] not in SETTLEABLE:
                raise InvalidStatus(f"cannot dispute escrow in status '{row[1]}'")
            conn.execute(
                "UPDATE escrows SET status = 'disputed', disputed_ms = ?, dispute_reason = ? "
                "WHERE escrow_id = ?",
                (self._now_ms(), reason, escrow_id),
            )
        return {"escrow_id": escrow_id, "status": "disputed", "reason": reason}

    def get(self, escrow_id: str) -> dict:
        """The escrow as ``GET /escrow/{id}`` shows it (refunding it first if it timed out)."""
        with self._tx(write=False) as conn:
            row = self._escrow_row(conn, escrow_id, expire=False)
        if row[1] in SETTLEABLE and self._now_ms() >= row[9]:
            with self._tx() as conn:
                row = self._escrow_row(conn, escrow_id, expire=True)
        return _record(row)

    def list_escrows(self, creator_id: Optional[str] = None) -> list[dict]:
        """All escrows (or one creator's), oldest first. Sandbox only: live cannot list."""
        self.expire_due()
        with self._tx(write=False) as conn:
            if creator_id is None:
                rows = conn.execute(
                    f"SELECT {_ESCROW_COLUMNS} FROM escrows ORDER BY created_ms, rowid"
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {_ESCROW_COLUMNS} FROM escrows WHERE creator_id = ? "
                    "ORDER BY created_ms, rowid",
                    (creator_id,),
                ).fetchall()
        return [_record(row) for row in rows]

    def expire_due(self) -> int:
        """Refund every escrow past its ``auto_release_at`` (minus the 1%); how many."""
        with self._tx() as conn:
            return self._expire_due(conn)

    def stats(self) -> dict:
        """Counts and volume, as ``GET /escrow/stats``."""
        with self._tx(write=False) as conn:
            counts = dict(
                conn.execute("SELECT status, COUNT(*) FROM escrows GROUP BY status").fetchall()
            )
            volume, commission = conn.execute(
                "SELECT COALESCE(SUM(amount), 0), "
                "COALESCE(SUM(CASE WHEN status = 'released' THEN commission END), 0) "
                "FROM escrows"
            ).fetchone()
        return {
            "total_created": sum(counts.values()),
            "total_released": counts.get("released", 0),
            "total_disputed": counts.get("disputed", 0),
            "total_refunded": counts.get("refunded", 0),
            "total_volume_usd": _usdc(volume),
            "total_commission_usd": _usdc(commission),
            "commission_rate": "1%",
            "referral_commission_rate": "15% of fees",
        }

    # -- agents, faucet, balances ----------------------------------------------------

    def register(self, name: str) -> dict:
        """A new agent with a sandbox key and a referral code (the key is stored hashed)."""
        if not isinstance(name, str) or not name.strip():
            raise InvalidRequest("name must be non-empty text", code="invalid_name")
        name = name.strip()[:100]
        api_key = "pf_sandbox_" + secrets.token_hex(16)
        agent_id = f"ag_{_slug(name)}_{secrets.token_hex(4)}"
        referral_code = "ref_" + secrets.token_hex(5)
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO agents (agent_id, name, key_hash, referral_code, created_ms) "
                "VALUES (?, ?, ?, ?, ?)",
                (agent_id, name, _key_hash(api_key), referral_code, self._now_ms()),
            )
        return {"agent_id": agent_id, "api_key": api_key, "referral_code": referral_code}

    def agent_for_key(self, api_key: str) -> Optional[str]:
        """The agent a sandbox key belongs to, or None."""
        if not isinstance(api_key, str) or not api_key:
            return None
        with self._tx(write=False) as conn:
            row = conn.execute(
                "SELECT agent_id FROM agents WHERE key_hash = ?", (_key_hash(api_key),)
            ).fetchone()
        return row[0] if row else None

    def referral_code(self, agent_id: str) -> str:
        """The referral code of an agent (NotFound if there is no such agent)."""
        with self._tx(write=False) as conn:
            row = conn.execute(
                "SELECT referral_code FROM agents WHERE agent_id = ?", (agent_id,)
            ).fetchone()
        if row is None:
            raise NotFound(f"agent {agent_id} not found")
        return row[0]

    def claim(self, agent_id: str, amount: Optional[AmountLike] = None) -> dict:
        """Faucet: mint free test USDC (default 100) into an agent's balance."""
        check_agent_id(agent_id, name="agent")  # says what is wrong with a 0x… address or ''
        if amount is None:
            value = FAUCET_DEFAULT_USDC
        else:
            value = parse_usdc(_plain_amount(amount, "amount"), name="amount", minimum=None)
            if value <= 0 or value > FAUCET_MAX_USDC:
                raise InvalidAmount(
                    f"amount must be more than 0 and at most {usdc_str(FAUCET_MAX_USDC)} USDC "
                    f"per claim, got {amount!r}"
                )
        micro = _micro(value)
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE agents SET usdc = usdc + ? WHERE agent_id = ?", (micro, agent_id)
            )
            if cur.rowcount != 1:
                raise NotFound(f"agent {agent_id} not found")
            conn.execute("UPDATE totals SET minted = minted + ? WHERE id = 1", (micro,))
            balance = conn.execute(
                "SELECT usdc FROM agents WHERE agent_id = ?", (agent_id,)
            ).fetchone()[0]
        return {"agent_id": agent_id, "claimed": value, "balance": _usdc(balance)}

    def balance(self, agent_id: str) -> dict:
        """``{"agent_id", "usdc", "locked"}`` of one agent (after refunding timed-out escrows)."""
        with self._tx() as conn:
            self._expire_due(conn, creator_id=agent_id)
            row = conn.execute(
                "SELECT usdc, locked FROM agents WHERE agent_id = ?", (agent_id,)
            ).fetchone()
        if row is None:
            raise NotFound(f"agent {agent_id} not found")
        return {"agent_id": agent_id, "usdc": _usdc(row[0]), "locked": _usdc(row[1])}

    def balances(self) -> dict:
        """Every agent's balance and locked funds, the house fees and all that was minted."""
        with self._tx() as conn:
            self._expire_due(conn)
            agents = conn.execute(
                "SELECT agent_id, usdc, locked FROM agents ORDER BY agent_id"
            ).fetchall()
            minted, house = conn.execute(
                "SELECT minted, house_fees FROM totals WHERE id = 1"
            ).fetchone()
        return {
            "agents": {a: {"usdc": _usdc(u), "locked": _usdc(k)} for a, u, k in agents},
            "house_fees": _usdc(house),
            "minted": _usdc(minted),
        }

    def check_invariant(self) -> None:
        """Raise AssertionError unless every micro-USDC minted is accounted for.

        ``minted == balances + locked in open escrows + house fees``, exactly; each
        agent's ``locked`` matches its open escrows; no balance is negative.
        """
        with self._tx(write=False) as conn:
            minted, house = conn.execute(
                "SELECT minted, house_fees FROM totals WHERE id = 1"
            ).fetchone()
            balances, negative = conn.execute(
                "SELECT COALESCE(SUM(usdc), 0), COUNT(CASE WHEN usdc < 0 OR locked < 0 THEN 1 END) "
                "FROM agents"
            ).fetchone()
            locked = conn.execute(
                "SELECT COALESCE(SUM(amount), 0) FROM escrows WHERE status IN (?, ?, ?)",
                OPEN_STATUSES,
            ).fetchone()[0]
            mismatched = conn.execute(
                "SELECT a.agent_id, a.locked, COALESCE(e.open, 0) FROM agents a LEFT JOIN "
                "(SELECT creator_id, SUM(amount) AS open FROM escrows WHERE status IN (?, ?, ?) "
                "GROUP BY creator_id) e ON e.creator_id = a.agent_id "
                "WHERE a.locked != COALESCE(e.open, 0)",
                OPEN_STATUSES,
            ).fetchall()
        problems = []
        if negative:
            problems.append(f"{negative} agent(s) with a negative balance")
        if minted != balances + locked + house:
            problems.append(
                f"minted {usdc_str(_usdc(minted))} != balances {usdc_str(_usdc(balances))} + "
                f"locked {usdc_str(_usdc(locked))} + house fees {usdc_str(_usdc(house))} "
                f"(off by {usdc_str(_usdc(minted - balances - locked - house))})"
            )
        for agent_id, recorded, actual in mismatched:
            problems.append(
                f"{agent_id} shows {usdc_str(_usdc(recorded))} locked but its open escrows "
                f"hold {usdc_str(_usdc(actual))}"
            )
        if problems:
            raise AssertionError("sandbox escrow invariant broken: " + "; ".join(problems))

    # -- internals -----------------------------------------------------------------

    def _escrow_row(self, conn: sqlite3.Connection, escrow_id: str, *, expire: bool) -> tuple:
        row = conn.execute(
            f"SELECT {_ESCROW_COLUMNS} FROM escrows WHERE escrow_id = ?", (escrow_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"escrow {escrow_id} not found")
        if expire and row[1] in SETTLEABLE and self._now_ms() >= row[9]:
            self._expire_row(conn, row)
            row = conn.execute(
                f"SELECT {_ESCROW_COLUMNS} FROM escrows WHERE escrow_id = ?", (escrow_id,)
            ).fetchone()
        return row

    def _settleable(self, conn: sqlite3.Connection, caller_id: str, escrow_id: str,
                    action: str) -> tuple:
        # Live order: not found, forbidden, then status.
        row = self._escrow_row(conn, escrow_id, expire=True)
        if row[5] != caller_id:
            raise PermissionDenied(f"only the escrow creator can {action} it")
        if row[1] not in SETTLEABLE:
            raise InvalidStatus(
                f"cannot {action} escrow in status '{row[1]}'", details={"status": row[1]}
            )
        return row

    def _pay_out(self, conn: sqlite3.Connection, payee: str, net: int, commission: int,
                 ref_share: int, referrer: Optional[str]) -> None:
        conn.execute("UPDATE agents SET usdc = usdc + ? WHERE agent_id = ?", (net, payee))
        if referrer and ref_share:
            conn.execute(
                "UPDATE agents SET usdc = usdc + ? WHERE agent_id = ?", (ref_share, referrer)
            )
            commission -= ref_share
        conn.execute(
            "UPDATE totals SET house_fees = house_fees + ? WHERE id = 1", (commission,)
        )

    def _expire_row(self, conn: sqlite3.Connection, row: tuple) -> None:
        """Live timeout rule: back to the creator minus the 1% (referrer gets their share)."""
        amount, commission, ref_share, referrer = row[2], row[3], row[14], row[15]
        conn.execute(
            "UPDATE escrows SET status = 'refunded', refunded_ms = ?, refund_kind = 'timeout' "
            "WHERE escrow_id = ?",
            (row[9], row[0]),
        )
        conn.execute(
            "UPDATE agents SET locked = locked - ? WHERE agent_id = ?", (amount, row[5])
        )
        self._pay_out(conn, row[5], amount - commission, commission, ref_share, referrer)

    def _expire_due(self, conn: sqlite3.Connection, creator_id: Optional[str] = None) -> int:
        now = self._now_ms()
        sql = (
            f"SELECT {_ESCROW_COLUMNS} FROM escrows "
            "WHERE status IN ('funded', 'completed') AND auto_release_ms <= ?"
        )
        params: tuple = (now,)
        if creator_id is not None:
            sql += " AND creator_id = ?"
            params = (now, creator_id)
        rows = conn.execute(sql, params).fetchall()
        for row in rows:
            self._expire_row(conn, row)
        return len(rows)


_AMOUNT_FIELDS = ("amount_usd", "commission_usd", "net_to_counterparty")


def _record(row: tuple) -> dict:
    amount, commission = row[2], row[3]
    return {
        "escrow_id": row[0],
        "status": row[1],
        "amount_usd": _usdc(amount),
        "commission_usd": _usdc(commission),
        "net_to_counterparty": _usdc(amount - commission),
        "description": row[4],
        "creator_id": row[5],
        "counterparty_id": row[6],
        "timeout_hours": row[7],
        "created_at": _iso(row[8]),
        "auto_release_at": _iso(row[9]),
        "completed_at": _iso(row[10]),
        "released_at": _iso(row[11]),
        "disputed_at": _iso(row[12]),
        "refunded_at": _iso(row[13]),
    }


def _record_from_json(text: str) -> dict:
    record: dict[str, Any] = json.loads(text)
    for field in _AMOUNT_FIELDS:
        record[field] = Decimal(record[field])
    return record
