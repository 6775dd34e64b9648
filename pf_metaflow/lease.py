"""Task leases: how ``reconcile`` tells a task that may still be running from one that ended.

Metaflow's service metadata keeps task heartbeats; local metadata keeps none. So
every attempt of a billable task holds a lease, written to the task's metadata
(type ``pf-escrow-lease``) and kept fresh by a background thread while the
attempt runs:

- ``running``: the attempt is alive until ``until`` (renewed every third of the lease);
- ``retrying``: the attempt failed and Metaflow will retry it; the escrow is held
  for the next attempt until ``until`` (the retry's wait plus one lease);
- ``ended``: the attempt is over and its escrow settled as far as it could.

A task is *active* (its escrow must not be touched by anyone else) while its
newest lease is ``running`` or ``retrying`` and not yet past ``until``. On the
same host, a ``running`` lease whose process is gone has ended early (a SIGKILL
needs no wait). No lease at all means no attempt of this version ever started:
nothing can be running.

Nothing here knows Metaflow: the writer is a callable that stores one record.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import threading
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional

LEASE_TYPE = "pf-escrow-lease"
DEFAULT_LEASE_SECONDS = 120.0

Writer = Callable[[str, dict], None]  # (field, value) -> stored durably


def lease_seconds() -> float:
    """``PF_LEASE_SECONDS`` (default 120): how long a lease lasts unless renewed."""
    raw = os.environ.get("PF_LEASE_SECONDS", "").strip()
    if not raw:
        return DEFAULT_LEASE_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 1 <= value <= 86400:
        from .errors import ConfigurationError

        raise ConfigurationError(f"PF_LEASE_SECONDS must be a number of seconds from 1 to 86400, got {raw!r}")
    return value


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _iso(moment: _dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(text: Any) -> Optional[_dt.datetime]:
    if not isinstance(text, str):
        return None
    try:
        moment = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=_dt.timezone.utc)


class LeaseKeeper:
    """Holds one attempt's lease: ``start()``, then ``retrying(wait)`` or ``end()``."""

    def __init__(self, attempt: int, write: Writer, seconds: Optional[float] = None) -> None:
        self.attempt = int(attempt)
        self._write = write
        self.seconds = seconds if seconds is not None else lease_seconds()
        self._n = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def _put(self, state: str, until: _dt.datetime) -> None:
        with self._lock:
            self._n += 1
            value = {
                "attempt": self.attempt,
                "n": self._n,
                "state": state,
                "until": _iso(until),
                "written_at": _iso(_now()),
                "host": socket.gethostname(),
                "pid": os.getpid(),
            }
            self._write(f"pf_lease_{self.attempt}_{self._n}", value)

    def start(self) -> None:
        self._put("running", _now() + _dt.timedelta(seconds=self.seconds))
        self._thread = threading.Thread(target=self._renew, name="pf-metaflow-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self._put("running", _now() + _dt.timedelta(seconds=self.seconds))
            except Exception:  # a missed renewal only shortens the lease; never kill the task
                pass

    def _halt(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def retrying(self, wait_seconds: float) -> None:
        """The attempt failed and Metaflow retries it: hold the escrow for the next attempt."""
        self._halt()
        self._put("retrying", _now() + _dt.timedelta(seconds=max(wait_seconds, 0) + self.seconds))

    def end(self) -> None:
        self._halt()
        self._put("ended", _now())


def record(field: str, value: Mapping[str, Any]) -> tuple[str, str]:
    """``(field, JSON text)`` of one lease record, as stored in task metadata."""
    return field, json.dumps(dict(value), sort_keys=True)


# A NamedTuple, not a dataclass: every paid task is a new process that defines it, and a
# dataclass costs ~0.5 ms to define there (issue 13).
class Activity(NamedTuple):
    """Whether a task may still be running, and why we think so."""

    active: bool
    why: str
    until: Optional[str] = None


def activity(leases: Iterable[Mapping[str, Any]], *, now: Optional[_dt.datetime] = None,
             host: Optional[str] = None, pid_alive: Optional[Callable[[int], bool]] = None) -> Activity:
    """Judge a task by its lease records (the decoded values of its ``pf-escrow-lease`` metadata)."""
    newest = None
    for lease in leases:
        key = (int(lease.get("attempt", -1)), int(lease.get("n", 0)))
        if newest is None or key > newest[0]:
            newest = (key, lease)
    if newest is None:
        return Activity(False, "no attempt holds a lease")
    lease = newest[1]
    now = now or _now()
    state, until = lease.get("state"), _parse(lease.get("until"))
    attempt = lease.get("attempt")
    if state == "ended":
        return Activity(False, f"attempt {attempt} ended")
    if until is None or until <= now:
        return Activity(False, f"attempt {attempt}'s lease ran out at {lease.get('until')}")
    if state == "running" and lease.get("host") == (host or socket.gethostname()):
        alive = pid_alive or _pid_alive
        pid = lease.get("pid")
        if isinstance(pid, int) and not alive(pid):
            return Activity(False, f"attempt {attempt}'s process {pid} is gone")
    what = "is running" if state == "running" else "failed and waits for its retry"
    return Activity(True, f"attempt {attempt} {what} (lease until {lease.get('until')})", lease.get("until"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped by its parent) still answers kill(0).
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True
