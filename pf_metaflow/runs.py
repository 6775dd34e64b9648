"""Reading a run's payments (every task, or saying which it could not see), and settling what it left open.

Reading (:func:`read_run`; :func:`ledger_of` for the entries alone) gathers, for each
task of a run, its escrow records (``pf-escrow`` metadata, written before and after
every escrow call, so tasks that died without artifacts still show), its leases
(``pf-escrow-lease`` metadata) and the ``pf_ledger`` artifacts (which also carry
entries cloned by ``resume``). It does not rely on one listing of tasks:

- Metaflow's client lists a task only if its metadata holds a ``_self.json``, and
  Metaflow's *local* metadata writes none for a task whose id is a plain integer
  passed in by an orchestrator (``step work --task-id 1``): the client never lists
  such tasks. So under local metadata the run's directory is scanned as well, and
  every task's metadata is read through the metadata provider, which reads it
  whatever the id.
- A metadata *service* registers no task whose id is a plain integer either (Metaflow
  takes such an id for one the service handed out), and ``metaflow-local-service``
  0.2.0 registers no run under an id an orchestrator chose (``init --run-id argo-…``:
  it assigns a number of its own), so the client cannot open such a run at all. The
  tasks' metadata is kept under the orchestrator's ids all the same, and every task
  writes its attempt to the datastore before any decorator runs. So under any
  metadata other than local, the run's tasks are also listed in the datastore (the
  one each task recorded, else the configured one) and read through the provider's
  task endpoints, whether or not the run is registered. :attr:`RunReading.source`
  says where a reading found the run.
- What the reading cannot prove it saw is listed in :attr:`RunReading.unseen`:

  - a task whose metadata cannot be read, or a task directory of a paid step without any;
  - a task of a paid step with no escrow record, no recorded outcome and no record of its
    own process (an attempt records where its datastore is before any decorator runs, and
    ``@pf_escrow_step`` writes its lease before any escrow: a task with none of these
    here may have run where its records were kept, on remote compute say);
  - a paid step with fewer tasks than the run provably started (a later step ran) or, for
    tasks an orchestrator launched (they register themselves), fewer than were due (a
    predecessor finished, a foreach split recorded N splits). Metaflow's own runtime
    registers each task before it starts it: there, a due task not seen never started;
  - which steps are paid, when the run's ``_graph_info`` cannot be read.

  Paid steps are those whose ``@pf_escrow_step`` shows in ``_graph_info`` (``--with``
  included, ``steps=`` honoured), and any step with an escrow record or lease of its own.

Reconcile (:func:`reconcile`) settles the run's open escrows whose attempt has
ended: an escrow whose task may still be running (its lease, see
:mod:`pf_metaflow.lease`) is skipped and reported, unless ``force=True``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Iterable, Optional, Union

from . import lease as lease_mod
from . import ledger as ledger_mod
from . import settle
from .decorator import LEDGER_ARTIFACT, METADATA_TYPE, escrow_metadatum

RunLike = Union[str, Any]  # "Flow/RUN_ID", or a metaflow.Run

PARAMETERS_STEP = "_parameters"
# Open and still to be settled by someone; refund_pending settles itself (and is reported).
UNSETTLED = frozenset({"locked", "unknown"})


# ---------------------------------------------------------------------------------------
# The result of reading a run


@dataclass(frozen=True)
class RunReading:
    """What reading a run found, and what it could not see.

    ``entries``: the run's ledger (merged, one entry per escrow). ``leases_by_task``:
    task pathspec (``Flow/run/step/task``) to its decoded lease records. ``unseen``:
    one line per thing the reading could not prove it saw; empty when ``complete``.
    """

    run: str
    entries: list[dict]
    leases_by_task: dict[str, list[dict]]
    unseen: list[str]
    tasks: tuple[str, ...] = ()
    paid_steps: tuple[str, ...] = ()
    unreadable_tasks: frozenset[str] = frozenset()
    source: str = ""  # where the run and its tasks were found (metadata provider, datastore)
    # Found beyond the client's listing (an unregistered run, tasks it does not list): the
    # terminal output then says where (``source``), since the Metaflow client alone would not.
    found_beyond_client: bool = False

    @property
    def complete(self) -> bool:
        return not self.unseen

    def activity(self, task: str, **kwargs: Any) -> lease_mod.Activity:
        """Whether ``task`` (a pathspec) may still be running, per its leases."""
        if task in self.unreadable_tasks:
            return lease_mod.Activity(True, "its metadata could not be read, so whether it still runs is unknown")
        return lease_mod.activity(self.leases_by_task.get(task, ()), **kwargs)

    def to_json(self) -> dict[str, Any]:
        """The ``pf-metaflow ledger --json`` document: entries, totals, ``complete``, ``unseen``."""
        return {**ledger_mod.to_json(self.run, self.entries), "complete": self.complete,
                "unseen": list(self.unseen), "source": self.source}


def read_run(run: RunLike) -> RunReading:
    """Read every task of ``run`` (a Metaflow ``Run`` or ``"Flow/123"``); say what could not be seen."""
    where = _Location.of(run)
    tasks = where.tasks()
    unseen: list[str] = []
    store = _Artifacts(where, tasks)
    graph, graph_error = _Graph.read(store, tasks)
    runs_tasks = [t for t in tasks if not t.step.startswith("_")]
    if where.listing_errors and not (tasks and all(t.listed for t in tasks)):
        # The provider did not list every task itself: the datastore was the only way to see them.
        unseen.extend(where.listing_errors)
    if graph_error and runs_tasks:
        unseen.append(f"{where.pathspec}: which steps are paid could not be read ({graph_error}); "
                      "only tasks with escrow records of their own are known to be paid")
    paid = graph.billed() | {t.step for t in runs_tasks if t.has_records}
    unseen.extend(_gaps(where, graph, paid, tasks, store, paid_known=graph_error is None))
    from_artifacts, artifact_gaps = _artifact_ledgers(tasks, store, graph)
    unseen.extend(artifact_gaps)
    entries = ledger_mod.merge(*(t.entries for t in tasks), from_artifacts)
    return RunReading(
        run=where.pathspec,
        entries=entries,
        leases_by_task={t.pathspec: list(t.leases) for t in tasks if t.leases},
        unseen=unseen,
        tasks=tuple(t.pathspec for t in runs_tasks),
        paid_steps=tuple(sorted(paid)),
        unreadable_tasks=frozenset(t.pathspec for t in tasks if t.error),
        source=where.describe(tasks),
        found_beyond_client=not where.registered or not all(t.listed for t in tasks),
    )


def ledger_of(run: RunLike) -> list[dict]:
    """Every escrow of a run: a Metaflow ``Run`` or ``"Flow/123"``.

    Gathered from each task's metadata and from the ``pf_ledger`` artifacts, for every
    task whatever its id; :func:`read_run` also says whether that is provably all.
    """
    return read_run(run).entries


# ---------------------------------------------------------------------------------------
# Where a run's tasks are


@dataclass
class _Task:
    step: str
    id: str
    pathspec: str
    listed: bool = False  # the Metaflow client lists it
    in_datastore: bool = False  # found by listing the run in a datastore
    has_meta: bool = True
    error: Optional[str] = None
    entries: list[dict] = field(default_factory=list)
    leases: list[dict] = field(default_factory=list)
    ok: Optional[bool] = None  # a recorded outcome: True once an attempt succeeded
    done: bool = False  # an attempt finished persisting (its artifacts can be read)
    ds: Optional[tuple[str, str]] = None  # (ds-type, ds-root) from its metadata
    ended: tuple = ()  # attempts that recorded an outcome, newest first

    @property
    def has_records(self) -> bool:
        return bool(self.entries or self.leases)


class _Location:
    """A run as the configured metadata provider (and, for local metadata, the disk; for any
    other, the datastore) holds it."""

    def __init__(self, flow: str, run_id: str, provider: Any, run_dir: Optional[str], *,
                 registered: bool = True) -> None:
        self.flow, self.run_id, self.provider, self.run_dir = flow, run_id, provider, run_dir
        self.pathspec = f"{flow}/{run_id}"
        self.registered = registered  # the provider knows the run itself (the client can open it)
        self.listed_in: list[str] = []  # the datastore locations the run's tasks were listed in
        self.listing_errors: list[str] = []
        self._listings: dict[tuple[str, str], list[tuple[str, str]]] = {}

    @classmethod
    def of(cls, run: RunLike) -> "_Location":
        from metaflow import Run
        from metaflow.exception import MetaflowNotFound

        provider = _provider(run)
        if not isinstance(run, str):
            flow, run_id = run.pathspec.split("/")
            return cls(flow, run_id, provider, _local_run_dir(provider, flow, run_id))
        try:
            # A pathspec names one run, whoever started it: no namespace check, and the
            # user's namespace (a global of the Metaflow client) is left as it was, unless
            # Metaflow cannot tell who the user is (see readable_namespace).
            readable_namespace()
            Run(run, _namespace_check=False)
        except MetaflowNotFound as exc:
            flow, _, run_id = run.partition("/")
            if _is_local(provider):
                # Local metadata registers no run whose id is a plain integer given by an
                # orchestrator; its directory is the run.
                run_dir = _local_run_dir(provider, flow, run_id)
                if run_dir is None or not any(_subdirs(run_dir)):
                    raise
                return cls(flow, run_id, provider, run_dir, registered=False)
            # A metadata service that did not register the run under this id (an orchestrator
            # chose it; metaflow-local-service 0.2.0 assigns its own): its tasks are in the
            # datastore, their records with the service under the orchestrator's ids.
            where = cls(flow, run_id, provider, None, registered=False)
            ds = _configured_datastore()
            if ds is None or not run_id or "/" in run_id:
                raise MetaflowNotFound(f"{exc} (it is not registered with {_provider_name(provider)}, "
                                       "and no datastore is configured here to look for its tasks)") from exc
            there = _join(ds[1], flow, run_id)
            try:
                if where._listing(ds):
                    return where
            except Exception as why:  # noqa: BLE001 - cannot tell: say so, as not found
                raise MetaflowNotFound(f"{exc} (it is not registered with {_provider_name(provider)}, and "
                                       f"its tasks could not be listed in the datastore {there}: "
                                       f"{type(why).__name__}: {why})") from exc
            raise MetaflowNotFound(f"{exc} (it is not registered with {_provider_name(provider)}, "
                                   f"nor has any task in the datastore {there})") from exc
        flow, run_id = run.split("/")
        return cls(flow, run_id, provider, _local_run_dir(provider, flow, run_id))

    def tasks(self) -> list[_Task]:
        found: dict[tuple[str, str], _Task] = {}

        def task(step: str, task_id: str) -> _Task:
            key = (step, str(task_id))
            if key not in found:
                found[key] = _Task(step, str(task_id), f"{self.pathspec}/{step}/{task_id}")
            return found[key]

        if self.registered:
            for step in self.provider.get_object("run", "step", {}, None, self.flow, self.run_id) or []:
                name = step["step_name"]
                for t in self.provider.get_object("step", "task", {}, None, self.flow, self.run_id, name) or []:
                    task(name, t["task_id"]).listed = True
        if self.run_dir is not None:
            for step in _subdirs(self.run_dir):
                for task_id in _subdirs(os.path.join(self.run_dir, step)):
                    t = task(step, task_id)
                    t.has_meta = os.path.isdir(os.path.join(self.run_dir, step, task_id, "_meta"))
        for t in found.values():
            if t.has_meta:
                self._read_metadata(t)
        if not _is_local(self.provider):
            self._add_datastore_tasks(found, task)
        return sorted(found.values(), key=lambda t: (t.step, _numeric_first(t.id)))

    def _add_datastore_tasks(self, found: dict, task: Any) -> None:
        """Add the tasks the run has in its datastores: each datastore a task recorded (else the
        configured one), and any further one the tasks found there recorded."""
        roots: list[tuple[str, str]] = []

        def want(ds: Optional[tuple[str, str]]) -> None:
            if ds is not None and ds not in roots:
                roots.append(ds)

        for t in found.values():
            want(t.ds)
        if not roots:
            want(_configured_datastore())
        i = 0
        while i < len(roots):
            ds = roots[i]
            i += 1
            where = _join(ds[1], self.flow, self.run_id)
            try:
                listing = self._listing(ds)
            except Exception as exc:  # noqa: BLE001 - whatever it is, that datastore was not listed
                self.listing_errors.append(f"{self.pathspec}: its tasks could not be listed in the datastore "
                                           f"{where} ({type(exc).__name__}: {exc})")
                continue
            self.listed_in.append(where)
            for step, task_id in listing:
                known = (step, task_id) in found
                t = task(step, task_id)
                t.in_datastore = True
                if known:
                    continue
                self._read_metadata(t)
                if not t.error and t.ds is None and not (t.entries or t.leases or t.done):
                    # Every attempt records where its datastore is before writing to it: this
                    # task's records were kept where this provider cannot see them.
                    t.has_meta = False
                want(t.ds)

    def _listing(self, ds: tuple[str, str]) -> list[tuple[str, str]]:
        """``(step, task_id)`` of every task directory of the run in datastore ``ds``."""
        if ds not in self._listings:
            self._listings[ds] = _datastore_tasks(self.flow, self.run_id, ds)
        return self._listings[ds]

    def describe(self, tasks: list[_Task]) -> str:
        """Where this reading found the run and its tasks (``RunReading.source``)."""
        by = _provider_name(self.provider)
        stores = ", ".join(self.listed_in)
        if self.registered:
            said = f"{self.pathspec}: registered with {by}, which listed {sum(t.listed for t in tasks)} task(s)"
            more = [t for t in tasks if t.in_datastore and not t.listed]
            if more:
                said += (f"; {len(more)} more task(s) found in the datastore ({stores}), "
                         "their records read from the provider's task metadata")
            elif self.run_dir is not None and not all(t.listed for t in tasks):
                said += f"; more found in its directory {self.run_dir}"
            return said
        if _is_local(self.provider):
            return (f"{self.pathspec}: not registered with {by} (an orchestrator chose its ids); "
                    f"its {len(tasks)} task(s) were found in its directory {self.run_dir}")
        return (f"{self.pathspec}: not registered with {by} under this id (an orchestrator chose it, "
                f"and the service keeps no run under it); its {len(tasks)} task(s) were found in the "
                f"datastore ({stores or 'not listed'}), their records read from the service's task metadata")

    def _read_metadata(self, task: _Task) -> None:
        try:
            records = self.provider.get_object(
                "task", "metadata", None, None, self.flow, self.run_id, task.step, task.id) or []
            outcomes: dict[int, bool] = {}
            ds = {}
            for m in records:
                kind, name, value = m.get("type"), m.get("field_name"), m.get("value")
                if kind == METADATA_TYPE:
                    task.entries.append(json.loads(value))
                elif kind == lease_mod.LEASE_TYPE:
                    task.leases.append(json.loads(value))
                elif name == "attempt_ok":
                    outcomes[_attempt_of(m)] = str(value) == "True"
                elif name == "attempt-done":
                    task.done = True
                elif name in ("ds-type", "ds-root"):
                    ds[name] = value
        except Exception as exc:  # noqa: BLE001 - whatever it is, this task was not seen
            task.error = f"{type(exc).__name__}: {exc}"
            task.entries, task.leases = [], []
            return
        if outcomes:
            task.ok = any(outcomes.values())
            task.done = True
            task.ended = tuple(sorted(outcomes, reverse=True))
        if "ds-type" in ds and "ds-root" in ds:
            task.ds = (ds["ds-type"], ds["ds-root"])


def _provider(run: RunLike):
    from metaflow import get_metadata
    from metaflow.client import core

    own = getattr(getattr(run, "_metaflow", None), "metadata", None)
    if own is not None:
        return own
    get_metadata()  # makes the client settle on its configured provider
    return core.current_metadata


def _is_local(provider: Any) -> bool:
    from metaflow.plugins.metadata_providers.local import LocalMetadataProvider

    return isinstance(provider, type) and issubclass(provider, LocalMetadataProvider)


def _provider_name(provider: Any) -> str:
    kind, info = getattr(provider, "TYPE", None), getattr(provider, "INFO", None)
    if _is_local(provider):
        return f"local metadata ({os.path.join(str(info), provider.DATASTORE_DIR)})"
    if kind == "service":
        return f"the metadata service at {info}"
    return f"{kind or type(provider).__name__} metadata" + (f" at {info}" if info else "")


def _configured_datastore() -> Optional[tuple[str, str]]:
    """The datastore this process is configured for (``METAFLOW_DEFAULT_DATASTORE`` and its root)."""
    from metaflow.metaflow_config import DEFAULT_DATASTORE
    from metaflow.plugins import DATASTORES

    impl = next((d for d in DATASTORES if d.TYPE == DEFAULT_DATASTORE), None)
    if impl is None:
        return None
    try:
        root = impl.get_datastore_root_from_config(lambda *a, **k: None, create_on_absent=False)
    except Exception:  # noqa: BLE001 - not configured
        return None
    return (impl.TYPE, str(root)) if root else None


def _datastore_tasks(flow: str, run_id: str, ds: tuple[str, str]) -> list[tuple[str, str]]:
    """``(step, task_id)`` of every task directory of ``flow/run_id`` in datastore ``ds``."""
    from metaflow.plugins import DATASTORES

    if run_id == "data":  # FLOW/data holds the flow's content-addressed artifacts, not a run
        return []
    impl = next((d for d in DATASTORES if d.TYPE == ds[0]), None)
    if impl is None:
        raise LookupError(f"datastore type {ds[0]!r} is not available here")
    storage = impl(ds[1])
    steps = [r.path for r in storage.list_content([storage.path_join(flow, run_id)]) if not r.is_file]
    found = []
    for r in storage.list_content(steps) if steps else ():
        if r.is_file:
            continue
        parts = r.path.rstrip("/").split("/")
        if len(parts) >= 2 and parts[-1]:
            found.append((parts[-2], parts[-1]))
    return sorted(set(found))


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _local_run_dir(provider: Any, flow: str, run_id: str) -> Optional[str]:
    """The run's directory under local metadata (``<dir>/.metaflow/Flow/RUN``), else None."""
    if not _is_local(provider):
        return None
    info = provider.INFO  # the directory holding .metaflow, as Metaflow itself resolved it
    path = os.path.join(str(info), provider.DATASTORE_DIR, flow, run_id)
    return path if os.path.isdir(path) else None


def _subdirs(path: str) -> Iterable[str]:
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return
    for name in names:
        if name != "_meta" and os.path.isdir(os.path.join(path, name)):
            yield name


def _attempt_of(record: dict) -> int:
    for tag in record.get("tags") or ():
        if isinstance(tag, str) and tag.startswith("attempt_id:"):
            try:
                return int(tag.split(":", 1)[1])
            except ValueError:
                pass
    return 0


def _numeric_first(task_id: str) -> tuple:
    return (0, int(task_id), "") if task_id.isdigit() else (1, 0, task_id)


# ---------------------------------------------------------------------------------------
# Artifacts (read through Metaflow's datastore, which needs no client listing)


class _Artifacts:
    def __init__(self, where: _Location, tasks: list[_Task]) -> None:
        self._where = where
        self._default = next((t.ds for t in tasks if t.ds), None)
        if self._default is None and where.run_dir is not None:
            self._default = ("local", os.path.dirname(os.path.dirname(where.run_dir)))
        self._stores: dict[tuple[str, str], Any] = {}

    def get(self, task: _Task, name: str, default: Any = None) -> Any:
        """The artifact ``name`` of ``task``'s newest attempt that saved its artifacts (``default``
        if absent). The newest attempt may still be running, or have died, with an earlier one
        finished: that one is read, never the half-written newest."""
        ds = task.ds or self._default
        if ds is None:
            raise LookupError("no datastore is recorded for this run")
        store = self._store(ds)
        failure: Optional[Exception] = None
        for attempt in task.ended or (None,):
            try:
                tds = store.get_task_datastore(self._where.run_id, task.step, task.id,
                                               attempt=attempt, mode="r")
            except Exception as exc:  # noqa: BLE001 - that attempt saved nothing; try an earlier one
                failure = failure or exc
                continue
            return tds[name] if name in tds else default
        if failure is not None and not task.ok and task.has_records:
            return default  # a failed task whose own records (read above) already say what it paid
        raise failure if failure is not None else LookupError("no attempt saved its artifacts")

    def _store(self, ds: tuple[str, str]):
        if ds not in self._stores:
            from metaflow.datastore import FlowDataStore
            from metaflow.plugins import DATASTORES

            impl = next((d for d in DATASTORES if d.TYPE == ds[0]), None)
            if impl is None:
                raise LookupError(f"datastore type {ds[0]!r} is not available here")
            self._stores[ds] = FlowDataStore(self._where.flow, None, storage_impl=impl, ds_root=ds[1])
        return self._stores[ds]


def _artifact_ledgers(tasks: list[_Task], store: _Artifacts, graph: "_Graph") -> tuple[list[dict], list[str]]:
    # The end step's ledger holds the whole run's when the run got that far;
    # otherwise each task's ledger holds what reached it.
    finished = [t for t in tasks if t.step == graph.end and t.ok]
    readable = finished or [t for t in tasks if t.done and not t.step.startswith("_")]
    out: list[dict] = []
    gaps: list[str] = []
    for task in readable:
        try:
            out.extend(store.get(task, LEDGER_ARTIFACT) or [])
        except Exception as exc:  # noqa: BLE001
            gaps.append(f"{task.pathspec}: its {LEDGER_ARTIFACT} artifact could not be read "
                        f"({type(exc).__name__}: {exc})")
    return out, gaps


# ---------------------------------------------------------------------------------------
# The flow's graph, as the run recorded it, and what it proves about the run's tasks


@dataclass
class _Graph:
    steps: dict[str, dict]
    start: str = "start"
    end: str = "end"

    @classmethod
    def read(cls, store: _Artifacts, tasks: list[_Task]) -> tuple["_Graph", Optional[str]]:
        # `_graph_info` is persisted by the run's _parameters task and passed down to every task.
        candidates = sorted((t for t in tasks if t.done or t.step == PARAMETERS_STEP),
                            key=lambda t: t.step != PARAMETERS_STEP)
        error = "no finished task of the run holds it"
        for task in candidates[:3]:
            try:
                info = store.get(task, "_graph_info")
            except Exception as exc:  # noqa: BLE001
                error = f"{type(exc).__name__}: {exc}"
                continue
            if isinstance(info, dict) and isinstance(info.get("steps"), dict):
                return cls(info["steps"], info.get("start_step") or "start", info.get("end_step") or "end"), None
        return cls({}), error

    def billed(self) -> set[str]:
        """Steps ``@pf_escrow_step`` bills (a ``steps=`` filter, from ``--with``, honoured)."""
        out = set()
        for name, info in self.steps.items():
            for deco in info.get("decorators") or ():
                if deco.get("name") != "pf_escrow_step":
                    continue
                only = (deco.get("attributes") or {}).get("steps")
                if only in (None, "None", "", []) or name in _names(only):
                    out.add(name)
        return out

    def kind(self, step: str) -> str:
        return self.steps.get(step, {}).get("type", "")

    def successors(self, step: str) -> list[str]:
        return list(self.steps.get(step, {}).get("next") or ())

    def predecessors(self, step: str) -> list[str]:
        return [name for name, info in self.steps.items() if step in (info.get("next") or ())]

    def split_of(self, join: str) -> Optional[str]:
        return next((n for n, i in self.steps.items() if i.get("matching_join") == join), None)

    def between(self, split: str, join: str) -> set[str]:
        """The steps strictly between a split and its join."""
        seen: set[str] = set()
        todo = [s for s in self.successors(split) if s != join]
        while todo:
            step = todo.pop()
            if step in seen or step == join:
                continue
            seen.add(step)
            todo.extend(self.successors(step))
        return seen


def _names(value: Any) -> set[str]:
    if isinstance(value, (list, tuple, set)):
        return {str(v).strip() for v in value}
    return {n.strip() for n in str(value).replace("+", ",").split(",") if n.strip()}


def _gaps(where: _Location, graph: _Graph, paid: set[str], tasks: list[_Task], store: _Artifacts,
          *, paid_known: bool) -> list[str]:
    """What the reading cannot prove it saw. Without the graph (``paid_known`` false), every
    step may be paid."""
    by_step: dict[str, list[_Task]] = {}
    for t in tasks:
        by_step.setdefault(t.step, []).append(t)
    gaps: list[str] = []
    for t in tasks:
        if t.step.startswith("_"):
            continue
        if t.error:  # whichever step it belongs to: a step can be paid through `--with` at task level
            gaps.append(f"{t.pathspec}: its metadata could not be read ({t.error})")
        elif not t.has_meta and (not paid_known or t.step in paid):
            gaps.append(f"{t.pathspec}: a task directory of a paid step without metadata (its escrow "
                        "records, if any, are kept where this reader cannot see them)")
        elif not (t.has_records or t.done or t.ds) and (not paid_known or t.step in paid):
            # Its own process records where its datastore is before any decorator runs, so a
            # task with none of that here never reached its lease here: it is starting, was
            # stopped first, or ran where its records were kept elsewhere (remote compute).
            gaps.append(f"{t.pathspec}: a task of a paid step with no escrow record, no recorded "
                        "outcome and no record of its own process here (it may still be starting, "
                        "have been stopped before it began, or have run where its records cannot be "
                        "seen from here)")
    runs_tasks = [t for t in tasks if not t.step.startswith("_")]
    # Metaflow's runtime registers every task it launches under an id it allocates (a number).
    launched_by_metaflow = bool(runs_tasks) and all(t.listed and t.id.isdigit() for t in runs_tasks)
    started = _Started(graph, by_step, store, launched_by_metaflow=launched_by_metaflow)
    for step in sorted(paid):
        mine = by_step.get(step, [])
        expected, why = started.count(step)
        if len(mine) < expected:
            gaps.append(f"{where.pathspec}/{step}: {expected} task(s) of this paid step were due "
                        f"({why}), but {len(mine)} can be seen here")
    gaps.extend(started.errors)
    return gaps


class _Started:
    """How many tasks of a step the run provably started, or was due to start, from its
    neighbours' records.

    A later step's task proves its predecessor's ran. A finished predecessor (a foreach
    split's recorded count) says how many were *due*: tasks an orchestrator launches
    register themselves, so a due task not seen may have run where this reader cannot
    see. Metaflow's own runtime (``run``, ``resume``) registers each task before it
    starts it, so there a due task not seen was never started (the run stopped first):
    only later steps count as evidence.
    """

    def __init__(self, graph: _Graph, by_step: dict[str, list[_Task]], store: _Artifacts,
                 *, launched_by_metaflow: bool) -> None:
        self.graph, self.by_step, self.store = graph, by_step, store
        self.launched_by_metaflow = launched_by_metaflow
        self.errors: list[str] = []
        self._memo: dict[str, tuple[int, str]] = {}

    def count(self, step: str) -> tuple[int, str]:
        if step not in self._memo:
            self._memo[step] = (0, "")  # a loop in the graph (a recursive switch) counts nothing
            self._memo[step] = self._count(step)
        return self._memo[step]

    def _count(self, step: str) -> tuple[int, str]:
        g = self.graph
        if self.launched_by_metaflow:
            best, why = 0, ""  # only later steps prove anything (see the class docstring)
        elif step == g.start:
            best, why = (1, "the run was initialised") if self.by_step.get(PARAMETERS_STEP) else (0, "")
        elif g.kind(step) == "join":
            best, why = self._join(step)
        else:
            counted = [self._from(pred, step) for pred in g.predecessors(step)]
            best = sum(n for n, _ in counted)
            why = "; ".join(reason for n, reason in counted if n)
        later, later_why = self._from_successors(step)
        return (later, later_why) if later > best else (best, why)

    def _ok(self, step: str) -> list[_Task]:
        return [t for t in self.by_step.get(step, []) if t.ok]

    def _from_successors(self, step: str) -> tuple[int, str]:
        """A task of a step that only ``step`` leads to (or of a join it feeds) was started by
        a task of ``step``: one each, unless ``step`` fans out (a foreach)."""
        g = self.graph
        best, why = 0, ""
        for succ in g.successors(step):
            ran = len(self.by_step.get(succ, []))
            if not ran or succ == step:
                continue
            if g.kind(succ) == "join":
                n = 1
            elif g.predecessors(succ) == [step]:
                n = 1 if g.kind(step) in ("split-foreach", "split-parallel") else ran
            else:
                continue
            if n > best:
                best, why = n, f"{ran} task(s) of {succ}, which only {step} leads to, ran"
        return best, why

    def _from(self, pred: str, step: str) -> tuple[int, str]:
        """Tasks of ``step`` that finished tasks of ``pred`` started."""
        kind = self.graph.kind(pred)
        done = self._ok(pred)
        if not done:
            return 0, ""
        if kind == "split-foreach":
            n = 0
            for t in done:
                splits = self._artifact(t, "_foreach_num_splits")
                n += int(splits) if isinstance(splits, int) else 1
            return n, f"{', '.join(t.pathspec.split('/', 2)[2] for t in done)} recorded {n} foreach split(s)"
        if kind == "split-switch":
            n = 0
            for t in done:
                transition = self._artifact(t, "_transition")
                chosen = transition[0] if isinstance(transition, (list, tuple)) and transition else None
                n += 1 if chosen is None or step in chosen else 0
            return n, f"{n} task(s) of {pred} chose it"
        if kind == "split-parallel":
            return 0, ""
        return len(done), f"{len(done)} task(s) of {pred} finished"

    def _join(self, join: str) -> tuple[int, str]:
        split = self.graph.split_of(join)
        if split is None:
            return 0, ""
        for step in self.graph.between(split, join):
            n, _ = self.count(step)
            if len(self._ok(step)) < max(n, 1):
                return 0, ""  # a branch did not finish: the join never started
        done = self._ok(split)
        return len(done), f"every branch of {split} finished"

    def _artifact(self, task: _Task, name: str) -> Any:
        try:
            return self.store.get(task, name)
        except Exception as exc:  # noqa: BLE001
            self.errors.append(f"{task.pathspec}: its {name} artifact could not be read "
                               f"({type(exc).__name__}: {exc})")
            return None


# ---------------------------------------------------------------------------------------
# Reconcile


@dataclass(frozen=True)
class Action:
    """One open escrow reconcile acted on (``before`` -> ``after``), or would act on (dry run)."""

    before: dict
    after: dict

    @property
    def changed(self) -> bool:
        return self.before.get("status") != self.after.get("status")

    def describe(self, *, dry_run: bool = False) -> str:
        b, a = self.before, self.after
        if dry_run:
            return f"{_where(a)} is {b['status']}: would look it up and refund what is still held"
        what = f"{b['status']} -> {a['status']}" if self.changed else f"still {a['status']}"
        why = f": {a['reason']}" if a.get("reason") and a["status"] != "released" else ""
        return f"{_where(a)} {what}{why}"


@dataclass(frozen=True)
class Skipped:
    """An open escrow left alone because its task may still be running."""

    entry: dict
    activity: lease_mod.Activity

    def describe(self) -> str:
        return (f"{_where(self.entry)} is {self.entry['status']}: skipped, its task may still be "
                f"running ({self.activity.why}); reconcile again once it has ended, or use --force")


def _where(entry: dict) -> str:
    name = entry.get("escrow_id") or entry.get("description")
    return (f"{name} ({entry['step']}/{entry['task']} attempt {entry['attempt']}, "
            f"{entry['amount_usdc']} USDC)")


@dataclass(frozen=True)
class Reconciliation:
    """What :func:`reconcile` did (or, in a dry run, would do), and what the run still owes."""

    run: str
    reading: RunReading
    actions: list[Action]
    skipped: list[Skipped]
    dry_run: bool = False

    @property
    def complete(self) -> bool:
        """Reading proved it saw every paid task of the run."""
        return self.reading.complete

    @property
    def still_open(self) -> list[dict]:
        """The run's own escrows still held with nobody settling them (skipped ones included)."""
        after = {a.after["ref"]: a.after for a in self.actions}
        if self.dry_run:
            after = {}
        return [after.get(e["ref"], e) for e in self._own()
                if after.get(e["ref"], e)["status"] in UNSETTLED]

    @property
    def refund_pending(self) -> list[dict]:
        """Escrows coming back by themselves at ``expected_at`` (settled, as far as anyone can)."""
        after = {a.after["ref"]: a.after for a in self.actions if not self.dry_run}
        return [after.get(e["ref"], e) for e in self._own()
                if after.get(e["ref"], e)["status"] == "refund_pending"]

    @property
    def carried_open(self) -> list[dict]:
        """Open escrows a ``resume`` carried over: the run that created them settles them."""
        return [e for e in self.reading.entries if e["run"] != self.run and e["status"] in UNSETTLED]

    @property
    def settled(self) -> bool:
        """Every escrow of the run was seen, and none is still held (refund_pending counts as settled)."""
        return self.complete and not self.still_open

    def _own(self) -> list[dict]:
        return [e for e in self.reading.entries if e["run"] == self.run]


def reconcile(run: RunLike, *, dry_run: bool = False, force: bool = False, client=None) -> Reconciliation:
    """Settle every escrow of ``run`` still open whose task has ended: look it up, refund what is held.

    Only entries whose own run is ``run`` are touched (entries a ``resume`` carried
    over belong to the run that created them). An escrow whose task may still be
    running (per its lease) is skipped unless ``force``. Each new state is written
    to the task's metadata, so a second reconcile finds nothing left to do. Escrows
    of tasks the reading could not see are not touched: ``Reconciliation.complete``
    says whether there may be any.
    """
    reading = read_run(run)
    todo = [e for e in reading.entries
            if e["status"] in ledger_mod.OPEN_STATUSES and e["run"] == reading.run]
    skipped: list[Skipped] = []
    act_on: list[tuple[dict, lease_mod.Activity]] = []
    for entry in todo:
        activity = reading.activity(_task_of(entry))
        if activity.active and not force:
            skipped.append(Skipped(entry, activity))
        else:
            act_on.append((entry, activity))
    if dry_run or not act_on:
        return Reconciliation(reading.run, reading, [Action(e, e) for e, _ in act_on], skipped, dry_run)
    if client is None:
        from .client import default_client

        client = default_client()
    writer = _MetadataWriter(reading.run.split("/")[0])
    actions = []
    for entry, activity in act_on:
        reason = (f"reconciled: its task ended without settling it ({activity.why})" if not activity.active
                  else f"reconciled with --force while its task may still be running ({activity.why})")
        after = settle.resolve(client, entry, reason, writer.record, by="reconcile")
        actions.append(Action(entry, after))
    return Reconciliation(reading.run, reading, actions, skipped, dry_run)


def _task_of(entry: dict) -> str:
    return f"{entry['run']}/{entry['step']}/{entry['task']}"


class _MetadataWriter:
    """Appends escrow records to a task's metadata, from outside any run."""

    def __init__(self, flow_name: str) -> None:
        from metaflow import get_metadata
        from metaflow.client import core
        from metaflow.metaflow_environment import MetaflowEnvironment

        get_metadata()  # makes the client pick its configured provider
        flow = SimpleNamespace(name=flow_name)
        self._provider = core.current_metadata(MetaflowEnvironment(flow), flow, None, None)

    def record(self, entry: dict) -> None:
        run_id = entry["run"].split("/")[1]
        self._provider.register_metadata(run_id, entry["step"], str(entry["task"]),
                                         [escrow_metadatum(entry, "reconcile")])


def readable_namespace() -> Optional[str]:
    """The Metaflow client's namespace, made usable for reading where Metaflow cannot tell who
    the user is (root with no ``$METAFLOW_USER``): every client object resolves the default
    namespace (``user:<name>``) and would raise ``MetaflowUnknownUser``, even for a run named
    by its pathspec. There, and only there, the client is switched to the global namespace
    (None, returned): nobody's runs are "yours" when you have no name."""
    from metaflow import get_namespace, namespace
    from metaflow.exception import MetaflowUnknownUser

    try:
        return get_namespace()
    except MetaflowUnknownUser:
        namespace(None)
        return None


def latest_run(flow_name: str) -> Optional[str]:
    """The flow's latest run in the current namespace (the user's own, unless they chose another),
    exactly as ``Flow(flow_name).latest_run`` resolves it; None when there is none. Where
    Metaflow cannot tell who the user is, the latest run of anyone (see
    :func:`readable_namespace`)."""
    from metaflow import Flow
    from metaflow.exception import MetaflowNamespaceMismatch

    readable_namespace()
    try:
        run = Flow(flow_name).latest_run
    except MetaflowNamespaceMismatch:  # the flow exists, but none of its runs is in this namespace
        return None
    return run.pathspec if run is not None else None
