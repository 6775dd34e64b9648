"""The running task's escrow context, as ``@pf_escrow_step`` hands it to the agent toolkit.

``@pf_escrow_step``'s ``task_pre_step`` calls :func:`set_current` (a few lines, marked
"issue 14 hook" in ``_paid_step.py``). Nothing here is persisted: it lives in the
task's process (every Metaflow task is a process of its own) and holds no key. This module
imports nothing heavy: the decorator imports it while Metaflow runs the task.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional


# A NamedTuple, not a dataclass: every paid task is a new process that defines it, and a
# dataclass costs ~0.5 ms to define there (issue 13).
class TaskContext(NamedTuple):
    """What the toolkit needs from the task it runs in.

    ``where``: (flow name, run id, step, task id). ``metadata``: the task's metadata
    provider (escrow records are written there, as the decorator writes its own).
    ``own_entry()``: the task's own escrow entry, if it locked one (its amount comes out of
    the step's budget before the agent's allowance). ``note(entries)``: put entries on the
    task's ``pf_ledger`` / ``pf_escrows`` artifacts (the decorator's ledger, so its later
    updates keep them). ``billed``: the decorator holds a lease for this task.
    ``write_lease(field, value)``: writes a lease record (for a step the decorator does not bill).
    """

    flow: Any
    where: tuple
    attempt: int
    metadata: Any
    budget_key: str
    billed: bool
    own_entry: Callable[[], Optional[dict]]
    note: Callable[[list], None]
    write_lease: Optional[Callable[[str, dict], None]] = None

    @property
    def task_ref(self) -> str:
        return "/".join(str(p) for p in self.where)


_current: Optional[TaskContext] = None


def set_current(context: Optional[TaskContext]) -> None:
    global _current
    _current = context


def current() -> Optional[TaskContext]:
    return _current
