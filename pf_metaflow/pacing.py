"""Pacing creates to the escrow service's rate limit, across the processes of a run.

The live service allows 20 creates per client address in a fixed 60 s window that opens
with the window's first request, and answers the 21st with
``429 {"error": "rate_limited", "message": "Too many requests. Limit: 20 per 60s"}`` and
no ``Retry-After``. A 429 is a provable no: the create was not processed, nothing locked.

The shards of one run on one machine share one escrow URL and key, hence one window. Inside
a Metaflow task (or wherever ``PF_ESCROW_PACING_DIR`` is set) they coordinate through a
small JSON file (``<tmp>/pf-metaflow-pacing-<uid>/<hash>.json``, the
hash of URL and key: the key itself never touches the disk), under an ``fcntl`` lock, that
records the limit learnt from the first 429, when the current window opened and how many
creates were sent in it. A create first takes a slot in the current window; when the
window is full it waits for the next one instead of sending. So N creates take about
``ceil(N / limit) - 1`` windows, and each process sees at most about one 429 (the one
that teaches it the limit, or a surprise from a client outside the file).

Each call's total waiting is bounded by the client's ``max_wait`` (``PF_ESCROW_MAX_WAIT``);
past it the create raises :class:`RateLimited` saying how long it waited and that
nothing was created. A waiting call logs one line, not one per window.

Elsewhere (a plain script, a test) each client paces only itself, in memory, so nothing
is written. The file is made only once a 429 has taught the limit: a run that never meets
the limit leaves nothing behind. Only HTTP servers are paced: the embedded sandbox has no
limit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, Optional, TypeVar

from .errors import RateLimited

__all__ = ["DEFAULT_WINDOW", "Budget", "Pacer", "parse_limit", "margin"]

log = logging.getLogger("pf_metaflow.client")

T = TypeVar("T")

DEFAULT_WINDOW = 60.0  # the live service's documented window (docs/design.md, "Rate limits")
_LIMIT_RE = re.compile(r"limit:\s*(\d+)\s*(?:requests?\s*)?per\s*(\d+(?:\.\d+)?)\s*s", re.I)


def parse_limit(message: Optional[str]) -> tuple[Optional[int], Optional[float]]:
    """``(limit, window seconds)`` from live's "Too many requests. Limit: 20 per 60s"."""
    match = _LIMIT_RE.search(message or "")
    if not match:
        return None, None
    limit, window = int(match.group(1)), float(match.group(2))
    return (limit if limit > 0 else None), (window if window > 0 else None)


def margin(window: float) -> float:
    """Slack after a window's end before the next send: the server's window opened when
    its first request *arrived*, a little after we recorded it."""
    return min(max(0.05, 0.02 * window), 2.0)


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def _sleep(seconds: float) -> None:
    from . import retries  # looked up late: tests replace retries._sleep

    retries._sleep(seconds)


class Budget:
    """One call's waiting for the rate limit: bounded in total by ``max_wait``, logged once.

    Time is ``max(wall clock, the end of the last wait)``: a test that replaces the sleep
    sees the waits as having happened, and its loops still end.
    """

    def __init__(self, what: str, max_wait: float) -> None:
        self.what = what
        self.max_wait = max_wait
        self.started = time.time()
        self._virtual = self.started
        self.waited = 0.0
        self.refusals = 0  # 429s this call received
        self.logged = False

    def now(self) -> float:
        return max(time.time(), self._virtual)

    def wait_until(self, until: float, limit: Optional[int], window: float) -> None:
        now = self.now()
        if until - self.started > self.max_wait:
            raise self.exceeded(until, limit, window)
        if not self.logged:
            self.logged = True
            log.warning(
                "pf-metaflow: %s: waiting for the escrow service's rate limit (%s) until %s "
                "(PF_ESCROW_MAX_WAIT allows waiting until %s)",
                self.what, _describe(limit, window), _clock(until),
                _clock(self.started + self.max_wait),
            )
        seconds = max(until - now, 0.0)
        self.waited += seconds
        _sleep(seconds)
        self._virtual = max(self._virtual, until)

    def exceeded(self, until: float, limit: Optional[int], window: float) -> RateLimited:
        waited = self.now() - self.started
        if self.refusals:
            fate = "it was refused with HTTP 429, so it was never processed"
        else:
            fate = "it was not sent, so it was never processed"
        return RateLimited(
            f"{self.what}: the escrow service's rate limit ({_describe(limit, window)}) was "
            f"still full after waiting {waited:.0f} s, and its next window (at {_clock(until)}) "
            f"is beyond PF_ESCROW_MAX_WAIT ({self.max_wait:g} s); {fate}: nothing was created "
            "and nothing is locked. Raise PF_ESCROW_MAX_WAIT or run fewer shards at once",
            details={"gave_up": True, "waited": round(waited, 3), "retry_after": None,
                     "limit": limit, "window": window, "max_wait": self.max_wait},
        )


def _describe(limit: Optional[int], window: float) -> str:
    return f"{limit} per {window:g} s" if limit else f"a window of {window:g} s"


def _state_dir() -> Optional[str]:
    """Where the shared windows are kept: ``$PF_ESCROW_PACING_DIR``; else, inside a
    Metaflow task, a per-user directory under the temp dir; else None (not shared)."""
    configured = os.environ.get("PF_ESCROW_PACING_DIR", "").strip()
    if configured:
        return configured
    metaflow = sys.modules.get("metaflow")
    if not getattr(getattr(metaflow, "current", None), "is_running_flow", False):
        return None
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return os.path.join(tempfile.gettempdir(), f"pf-metaflow-pacing-{uid}")


class Pacer:
    """The shared window of every client of one escrow URL and key on this machine."""

    def __init__(self, base: str, key: str, directory: Optional[str] = None) -> None:
        self._name = hashlib.sha256(f"{base}\n{key}".encode()).hexdigest()[:32] + ".json"
        self._directory = directory
        self._thread_lock = threading.Lock()
        self._memory: dict[str, Any] = {}  # when there is no shared file

    @property
    def path(self) -> Optional[str]:
        directory = self._directory or _state_dir()
        return os.path.join(directory, self._name) if directory else None

    def __repr__(self) -> str:
        return f"Pacer({self.path or 'in memory'!r})"

    # -- the shared state ---------------------------------------------------------------

    @contextlib.contextmanager
    def _state(self, create: bool = True) -> Iterator[dict]:
        with self._thread_lock:
            path = self.path
            if path is None:
                yield self._memory  # not shared: this client paces itself
                return
            try:
                if create:
                    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
                fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
            except FileNotFoundError:
                yield {}  # nothing learnt yet: nothing to share, nothing written
                return
            except OSError:
                yield self._memory  # no usable shared file: pace this client alone
                return
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX)
                raw = b""
                while True:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    raw += chunk
                try:
                    state = json.loads(raw) if raw.strip() else {}
                except ValueError:
                    state = {}
                if not isinstance(state, dict):
                    state = {}
                before = dict(state)
                yield state
                if state != before:
                    data = json.dumps(state).encode()
                    os.lseek(fd, 0, os.SEEK_SET)
                    os.ftruncate(fd, 0)
                    os.write(fd, data)
            finally:
                os.close(fd)  # also releases the lock

    @staticmethod
    def _window(state: dict) -> float:
        window = state.get("window")
        return float(window) if isinstance(window, (int, float)) and window > 0 else DEFAULT_WINDOW

    @classmethod
    def _roll(cls, state: dict, now: float) -> None:
        """Forget a window that has passed (or a start in the future: clocks moved)."""
        start = state.get("start")
        if not isinstance(start, (int, float)):
            state.update(start=None, sent=0, full=False)
            return
        window = cls._window(state)
        if now >= start + window + margin(window) or start > now + window:
            state.update(start=None, sent=0, full=False)

    def reserve(self, now: float) -> tuple[Optional[float], Optional[int], float]:
        """Take a slot in the current window: ``(None, …)``, or ``(when the next window
        opens, limit, window)`` when this one is full. The window's first slot is marked
        ``opener``: its answer time is when the server's window opened at the latest."""
        with self._state(create=False) as state:
            self._roll(state, now)
            window = self._window(state)
            limit = state.get("limit")
            sent = int(state.get("sent") or 0)
            if state["start"] is not None and (state.get("full") or (limit and sent >= limit)):
                return state["start"] + window + margin(window), limit, window
            if state["start"] is None:
                state["start"] = now
                state["opener"] = now
            state["sent"] = sent + 1
            return None, limit, window

    def answered(self, opened: float, now: float) -> None:
        """The first request of the window opened at ``opened`` was answered at ``now``:
        the server's window opened between the two, so it surely ends ``window`` after
        ``now`` (a late end wastes a moment; an early one, a 429)."""
        with self._state(create=False) as state:
            if state.get("opener") == opened and state.get("start") == opened:
                state["start"] = max(now, opened)
                state.pop("opener", None)

    def refused(self, now: float, message: Optional[str]) -> None:
        """A 429 without Retry-After: learn the limit, and mark the window full."""
        limit, window = parse_limit(message)
        with self._state() as state:
            if limit:
                state["limit"] = limit
            if window:
                state["window"] = window
            self._roll(state, now)
            if state["start"] is None:
                # The server's window opened before anything this file saw: assume the
                # worst, that it opened just now.
                state["start"] = now
            state["full"] = True

    # -- one paced call -------------------------------------------------------------------

    def send(self, attempt: Callable[[], T], budget: Budget, retry: bool = True) -> T:
        """``attempt()`` in a free slot of the shared window, waiting (within ``budget``)
        as long as the window is full. A 429 with ``Retry-After`` goes to the caller: the
        server itself says when to come back. ``retry`` False: a 429 is learnt from and
        raised (``max_attempts=1``)."""
        for _ in range(10_000):  # bounded; in practice the budget ends the loop
            reserved_at = budget.now()
            until, limit, window = self.reserve(reserved_at)
            if until is not None:
                budget.wait_until(until, limit, window)
                continue
            try:
                return attempt()
            except RateLimited as exc:
                if exc.retry_after is not None:
                    raise
                budget.refusals += 1
                self.refused(budget.now(), exc.message)
                if not retry:
                    exc.details["gave_up"] = True  # max_attempts=1: sent once, never again
                    raise
            finally:
                self.answered(reserved_at, budget.now())
        raise budget.exceeded(budget.now(), None, DEFAULT_WINDOW)
