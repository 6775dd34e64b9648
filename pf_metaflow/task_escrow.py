"""One billable task's escrow, as one of its attempts sees it (no Metaflow in here).

A task has one escrow, shared by its attempts (docs/design.md, settlement rule 1).
The first attempt that needs it creates it; a later attempt (after an exception, a
failed persist, or a hard kill) adopts it instead of creating another. The escrow is
released once, when an attempt succeeds; refunded only when the task has finally
failed (no user retry left, ``@catch``'s fallback, or the release gate failed).

Should a task ever need a second escrow (its first was refunded under it, say by a
forced ``reconcile`` or the service's timeout), the new one gets its own ledger
entry, ``ref`` ``Flow/run/step/task#2``, so the first stays on the ledger.

The caller supplies the I/O: ``read()`` returns the ledger records written for this
task so far (by any attempt, or by ``reconcile``); ``write(entry)`` stores one durably
(raising if it cannot); ``client()`` gives the escrow client.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from . import ledger as ledger_mod
from . import settle
from .ledger import Entry, advance

Builder = Callable[[str, int], Entry]  # (ref, generation) -> the intent entry for a new escrow


class EscrowUnavailable(settle.SettlementError):
    """This attempt cannot pay from the task's escrow and must not lock another."""

    default_code = "escrow_unavailable"


class TaskEscrow:
    def __init__(self, task_ref: str, attempt: int, *, read: Callable[[], list],
                 write: Callable[[Entry], None], client: Callable[[], Any],
                 log: Callable[[str], None] = print) -> None:
        self.task_ref = task_ref
        self.attempt = int(attempt)
        self._read = read
        self._write = write
        self._client = client
        self._log = log
        self.entry: Optional[Entry] = None
        self.release_tried = False
        self.release_rate_limited = False
        self.held_for_retry = False

    # -- what earlier attempts left ---------------------------------------------------

    def latest(self) -> Optional[Entry]:
        """The task's newest escrow entry as recorded so far (None if it never had one)."""
        mine = [r for r in self._read() if _task_ref(r.get("ref", "")) == self.task_ref]
        if not mine:
            return None
        by_ref: dict[str, list] = {}
        for record in mine:
            by_ref.setdefault(record["ref"], []).append(record)
        newest_ref = max(by_ref, key=_generation)
        merged = ledger_mod.merge(by_ref[newest_ref])  # drops a create the service refused
        return merged[0] if merged else None

    def _generation_after(self) -> int:
        refs = {r.get("ref", "") for r in self._read() if _task_ref(r.get("ref", "")) == self.task_ref}
        return max((_generation(r) for r in refs), default=0) + 1

    # -- the attempt's life -------------------------------------------------------------

    def lock(self, build: Builder) -> Entry:
        """Adopt the task's escrow, or lock a new one. Returns the entry (``locked``, or
        ``released`` when an earlier attempt already paid: this attempt runs unpaid)."""
        earlier = self.latest()
        if earlier is not None:
            entry = settle.adopt(self._client(), earlier, self.attempt, self._write_best_effort)
            status = entry["status"]
            where = f"escrow {entry.get('escrow_id') or '(unknown)'} of attempt {entry['attempt']}"
            if status == "released":
                self.entry = entry
                self._log(f"[pf-metaflow] {where} was already released to {entry['recipient']}; "
                          f"attempt {self.attempt} runs unpaid (a task is paid at most once)")
                return entry
            if status == "locked":
                self.entry = entry
                self._log(f"[pf-metaflow] attempt {self.attempt} pays from {where} "
                          f"({entry['amount_usdc']} USDC still held)")
                return entry
            if status == "unknown":
                raise EscrowUnavailable(
                    f"the outcome of this task's create is unknown and the service cannot say whether "
                    f"it locked funds, so no second escrow is created (it could lock twice): "
                    f"{entry.get('reason')}", entry)
            if status == "refund_pending":
                raise EscrowUnavailable(
                    f"this task's {where} is refund_pending ({entry.get('reason')}); its "
                    f"{entry['amount_usdc']} USDC is still held until then, and locking again would "
                    "exceed the step's budget", entry)
            if status == ledger_mod.NOT_CREATED:
                # Nothing was ever locked: try the create again under the same entry, its
                # records numbered after the not_created one, so a success supersedes it.
                self._log(f"[pf-metaflow] attempt {entry['attempt']} created no escrow "
                          f"({entry.get('reason')}); attempt {self.attempt} tries again")
                generation = _generation(entry["ref"])
                intent = dict(build(entry["ref"], generation), seq=int(entry.get("seq", 0)) + 1)
                self.entry = settle.open_escrow(self._client(), intent, self._write)
                return self.entry
            self._log(f"[pf-metaflow] {where} is {status}; attempt {self.attempt} locks a new one")
        generation = self._generation_after() if earlier is not None else 1
        ref = self.task_ref if generation == 1 else f"{self.task_ref}#{generation}"
        self.entry = settle.open_escrow(self._client(), build(ref, generation), self._write)
        return self.entry

    def succeed(self, gate_ok: bool, why: str) -> Optional[Entry]:
        """The body succeeded: release (gate holds) or refund with ``why`` (gate failed: final)."""
        entry = self.entry
        if entry is None or entry["status"] == "released":
            return entry
        if gate_ok:
            self.release_tried = True
            try:
                self.entry = settle.release(self._client(), entry, self._write_best_effort, by=self.attempt)
            except settle.SettlementError as exc:
                self.entry = exc.entry
                # A release refused with 429 past the wait bound provably did nothing: the work
                # is done, so its escrow is kept locked (not refunded) for a person or reconcile.
                self.release_rate_limited = isinstance(exc, settle.ReleaseRateLimited)
                raise
        else:
            self.entry = settle.refund(self._client(), entry, why, self._write_best_effort, by=self.attempt)
        return self.entry

    def fail(self, reason: str, *, final: bool) -> Optional[Entry]:
        """The attempt failed. Not final: hold the escrow for the next attempt. Final: give back
        what is still held (looking first where a release may have happened), except an
        escrow whose release was rate limited past the wait bound: the work was done, so it
        stays ``locked`` for ``pf_release`` or ``reconcile``."""
        entry = self.entry
        adopted = False
        if entry is None:  # failed before locking, or @catch's fallback after a killed attempt
            entry = self.latest()
            adopted = entry is not None
        if entry is None or entry["status"] not in ledger_mod.OPEN_STATUSES:
            self.entry = entry
            return entry
        if final and self.release_rate_limited and entry["status"] == "locked":
            self.entry = advance(entry, reason=f"{entry.get('reason')} (kept locked when the task "
                                               "failed: its work was done)")
            self._write_best_effort(self.entry)
            return self.entry
        if not final:
            self.held_for_retry = True
            self.entry = advance(entry, reason=f"attempt {self.attempt} failed ({reason}); held for the "
                                               "next attempt")
            self._write_best_effort(self.entry)
            return self.entry
        settle_fn = settle.resolve if (self.release_tried or adopted) else settle.refund
        self.entry = settle_fn(self._client(), entry, reason, self._write_best_effort, by=self.attempt)
        return self.entry

    def _write_best_effort(self, entry: Entry) -> None:
        try:
            self._write(entry)
        except Exception as exc:  # noqa: BLE001 - the service holds the truth; adopt/reconcile re-read it
            self._log(f"[pf-metaflow] could not record escrow {entry.get('escrow_id')} "
                      f"({entry.get('status')}) in task metadata: {type(exc).__name__}: {exc}")


def _task_ref(ref: str) -> str:
    return ref.split("#", 1)[0]


def _generation(ref: str) -> int:
    _, _, n = ref.partition("#")
    return int(n) if n.isdigit() else 1
