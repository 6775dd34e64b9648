"""Server-side fault injection for the fault matrix: the sandbox escrow over HTTP, misbehaving
on command.

:class:`FaultServer` runs the sandbox app (``make_app``) on a Werkzeug server in a thread of
the test process, behind :class:`FaultInjector`, a WSGI middleware whose :class:`Rule` s the
test sets in memory. Flows run as subprocesses pointed at ``server.url``; the test decides
what their requests meet:

- an answer replaced by ``500``, ``503`` or ``429`` (both with ``Retry-After: 1``), or by an
  HTML page where escrow JSON belongs (``malformed``);
- no answer: the connection dropped (``drop``), or held past the client's timeout
  (``hold=READ_TIMEOUT``);
- a server that stops listening (connection refused), for a while or until the test says;
- the flow's task SIGKILLed while its request is in flight (its pid comes from a file the
  task writes, see ``tests/flows/fault_points.py``).

``acts`` says whether the sandbox acts on the request before the fault answers it: a fault
*instead of* a create or release (``acts=False``), or *after* the service did it
(``acts=True``), the ambiguous case where the client cannot know what happened.
"""

from __future__ import annotations

import inspect
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from pf_metaflow.client import EscrowClient
from pf_metaflow.sandbox.engine import SandboxEngine
from pf_metaflow.sandbox.server import make_app, make_http_server

# Seconds the client waits for an answer (not configurable from the environment): an answer
# held this long arrives after the client gave up.
CLIENT_TIMEOUT: float = inspect.signature(EscrowClient).parameters["timeout"].default
READ_TIMEOUT = CLIENT_TIMEOUT + 0.5
FOREVER = math.inf

CREATE = "POST /escrow/create"
RELEASE = "POST /escrow/release/"
# Every request a task makes once its escrow is created: release, refund, read-backs.
AFTER_CREATE = ("POST /escrow/release/", "POST /escrow/refund/", "GET /escrow/")

_HTML = (b"<!DOCTYPE html><html><head><title>Service update</title></head>"
         b"<body><h1>We'll be right back</h1></body></html>")
_ERRORS = {
    "http_500": ("500 INTERNAL SERVER ERROR", b'{"error": "internal_error", "message": "injected"}'),
    "http_503": ("503 SERVICE UNAVAILABLE", b'{"error": "service_unavailable", "message": "injected"}'),
    "http_429": ("429 TOO MANY REQUESTS", b'{"error": "rate_limited", "message": "injected"}'),
}


@dataclass
class Rule:
    """What the next matching request(s) meet.

    ``requests`` are prefixes of ``"METHOD /path"``. ``answer``: ``as_is`` (the sandbox's
    own, or 200 if it did not act), ``drop`` (close the connection, no answer), ``http_500``,
    ``http_503``, ``http_429`` or ``malformed`` (an HTML page with the status the sandbox
    would have sent, 200 if it did not act). ``hold``: seconds before answering.
    ``stop_listening``: refuse connections from before this answer for that many seconds
    (``FOREVER``: until the test calls :meth:`FaultServer.listen`). ``kill_task``: SIGKILL
    the flow's task before answering. ``times``: how many requests (None: all, an outage).
    """

    requests: tuple[str, ...]
    answer: str = "as_is"
    acts: bool = False
    hold: float = 0.0
    stop_listening: Optional[float] = None
    kill_task: bool = False
    times: Optional[int] = 1

    def matches(self, line: str) -> bool:
        return (self.times is None or self.times > 0) and line.startswith(self.requests)


@dataclass
class _Captured:
    status: str = "200 OK"
    headers: list = field(default_factory=list)
    body: bytes = b""


class FaultInjector:
    """WSGI middleware: requests pass to ``app`` unless a :class:`Rule` matches them."""

    def __init__(self, app: Callable, server: "FaultServer") -> None:
        self.app = app
        self.server = server
        self.rules: list[Rule] = []
        self.log: list[str] = []  # "METHOD /path -> what happened", for failure messages
        self._lock = threading.Lock()

    def add(self, *rules: Rule) -> None:
        with self._lock:
            self.rules.extend(rules)

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def _take(self, line: str) -> Optional[Rule]:
        with self._lock:
            for rule in self.rules:
                if rule.matches(line):
                    if rule.times is not None:
                        rule.times -= 1
                    return rule
        return None

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        line = f"{environ['REQUEST_METHOD']} {environ.get('PATH_INFO', '')}"
        rule = self._take(line)
        if rule is None:
            self.log.append(f"{line} -> passed")
            return self.app(environ, start_response)
        self.log.append(f"{line} -> {rule}")
        return self._inject(rule, environ, start_response)

    def _inject(self, rule: Rule, environ: dict, start_response: Callable) -> Iterable[bytes]:
        real = self._act(environ) if rule.acts else None
        if rule.stop_listening is not None:
            self.server.stop_listening(rule.stop_listening)
        if rule.kill_task:
            self.server.kill_task()
        if rule.hold:
            time.sleep(rule.hold)
        if rule.answer == "drop":
            # Werkzeug treats this as the client going away: no answer, connection closed.
            raise ConnectionAbortedError("fault injection: connection dropped")
        if rule.answer == "as_is":
            answer = real or _Captured(body=b"{}")
            start_response(answer.status, answer.headers)
            return [answer.body]
        if rule.answer == "malformed":
            start_response(real.status if real else "200 OK", [("Content-Type", "text/html")])
            return [_HTML]
        status, body = _ERRORS[rule.answer]
        headers = [("Content-Type", "application/json")]
        if rule.answer in ("http_503", "http_429"):
            headers.append(("Retry-After", "1"))
        start_response(status, headers)
        return [body]

    def _act(self, environ: dict) -> _Captured:
        captured = _Captured()

        def capture(status: str, headers: list, exc_info=None) -> Callable:
            captured.status, captured.headers = status, list(headers)
            return lambda data: None

        result = self.app(environ, capture)
        try:
            captured.body = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        return captured


class FaultServer:
    """The sandbox escrow on 127.0.0.1 in a thread, behind a :class:`FaultInjector`.

    ``idempotency=False, refunds=False`` behaves like the live service (no refund call,
    ``Idempotency-Key`` ignored). The port stays the same when the server stops listening
    and comes back, so flows keep their ``PF_ESCROW_URL``.
    """

    def __init__(self, db: Path, *, idempotency: bool, refunds: bool, pid_file: Path) -> None:
        db.parent.mkdir(parents=True, exist_ok=True)
        self.engine = SandboxEngine(db)
        self.engine.check_invariant()  # creates the database before anyone connects
        self.pid_file = pid_file
        self.injector = FaultInjector(make_app(self.engine, idempotency=idempotency,
                                               refunds=refunds), self)
        self.port = 0
        self._http = None
        self._thread: Optional[threading.Thread] = None
        self._timer: Optional[threading.Timer] = None
        self._lock = threading.RLock()
        self.listen()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def listening(self) -> bool:
        return self._http is not None

    def listen(self) -> None:
        """Accept connections (again, on the same port)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._http is not None:
                return
            for attempt in range(50):
                try:
                    self._http = make_http_server(self.injector, "127.0.0.1", self.port)
                    break
                except OSError:  # the port is being released; it is ours again in a moment
                    if attempt == 49:
                        raise
                    time.sleep(0.05)
            self.port = self._http.server_port
            self._thread = threading.Thread(target=self._http.serve_forever,
                                            kwargs={"poll_interval": 0.05}, daemon=True)
            self._thread.start()

    def stop_listening(self, back_after: float = FOREVER) -> None:
        """Refuse new connections (requests already accepted still get answers)."""
        with self._lock:
            if self._http is not None:
                self._http.shutdown()
                self._http.socket.close()
                self._http = None
            if back_after != FOREVER:
                self._timer = threading.Timer(back_after, self.listen)
                self._timer.daemon = True
                self._timer.start()

    def kill_task(self) -> None:
        """SIGKILL the flow task that wrote the pid file."""
        pid = int(self.pid_file.read_text().strip())
        os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self.stop_listening(FOREVER)
        self.engine.close()
