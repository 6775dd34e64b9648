"""Per-process probe for pf-metaflow benchmarks and the overhead-count tests.

Active only when ``PF_BENCH_PROBE`` names a directory and this directory is on
``PYTHONPATH`` (Python imports ``sitecustomize`` at start-up). In every Metaflow task
process it then wraps, without changing what they do:

- the ``@pf_escrow_step`` hooks (``step_init``, ``task_pre_step``, ``task_decorate``,
  ``task_post_step``, ``task_exception``, ``task_finished``, and ``PaidStep._lock_escrow``: the
  lock done by ``task_decorate``'s wrapper): calls, CPU and wall seconds (inclusive: a hook's
  time contains the engine opening, client building and metadata writes it caused);
- the parts: ``SandboxEngine._open`` (connect + pragmas + schema check; and whether the
  database's WAL was already there, kept by another connection),
  ``SandboxEngine._ensure_schema``, ``sqlite3.connect``, ``EscrowClient.__init__``,
  ``default_client``, the paid step's metadata writes (``PaidStep._record`` = escrow records,
  ``PaidStep._write_lease`` = lease records) and reads of its task's escrow records
  (``PaidStep._records``), the flow-wide graph checks (``_check_budget_keys``), every
  ``register_metadata`` call of the metadata provider, ``SandboxEngine.create`` / ``release``;
- imports of ``pf_metaflow`` modules (outermost only, so nested imports are not counted
  twice; a pf_metaflow module's own imports of e.g. requests count under it), and which
  ``pf_metaflow`` modules (and ``decimal``, ``sqlite3``, ``tenacity``) the process loaded;

- Metaflow's ``MetaflowTask.run_step`` (in plain tasks too) and the moment ``metaflow``
  finished importing, as a timeline of the process;

and at exit writes ``<pid>.json`` to that directory with the counts, times, the
process's total CPU seconds (and its CPU seconds when ``import metaflow`` returned), its
wall seconds since this probe loaded, the timeline and its command line (to tell task
processes apart). The wrapping costs a few microseconds
per call; a plain and a paid task both carry the probe.
"""

import os

_OUT = os.environ.get("PF_BENCH_PROBE")

if _OUT:
    import atexit
    import functools
    import importlib.abc
    import importlib.machinery
    import json
    import sys
    import time

    _stats = {}
    _born = time.perf_counter()
    _depth = {"import": 0}

    _timeline = []
    _cpu_at = {}  # process CPU seconds at moments of the process's life

    def _add(name, cpu, wall):
        if name.startswith("hook."):
            _timeline.append((name, round((time.perf_counter() - _born - wall) * 1000, 2),
                              round(wall * 1000, 2)))
        s = _stats.setdefault(name, [0, 0.0, 0.0])
        s[0] += 1
        s[1] += cpu
        s[2] += wall

    def _timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            c0, w0 = time.process_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _add(name, time.process_time() - c0, time.perf_counter() - w0)
        wrapper.__pf_probe__ = True
        return wrapper

    def _wrap(owner, attr, name):
        fn = getattr(owner, attr, None)
        if fn is not None and not getattr(fn, "__pf_probe__", False):
            setattr(owner, attr, _timed(name, fn))

    def _note_log(cls):
        # Whether the database's WAL was there when this process opened it: kept alive by
        # another connection (Metaflow's runtime holds one) rather than made anew.
        opened = cls._open

        @functools.wraps(opened)
        def _open(self, *args, **kwargs):
            if os.path.exists(f"{self.path}-wal"):
                _add("engine.open_found_log", 0.0, 0.0)
            return opened(self, *args, **kwargs)
        _open.__pf_probe__ = True
        cls._open = _open

    def _patch(module):
        name = module.__name__
        if name == "pf_metaflow._step_decorator":
            cls = module.PfEscrowStepDecorator
            for hook in ("step_init", "task_pre_step", "task_decorate", "task_post_step",
                         "task_exception", "task_finished"):
                _wrap(cls, hook, f"hook.{hook}")
        elif name == "pf_metaflow._paid_step":  # what the hooks hand over to
            cls = module.PaidStep
            _wrap(cls, "_lock_escrow", "hook.task_decorate/lock")
            _wrap(cls, "_record", "metadata.escrow_record")
            _wrap(cls, "_write_lease", "metadata.lease_record")
            _wrap(cls, "_note", "ledger.artifacts")
            _wrap(cls, "_records", "metadata.task_records")
            _wrap(module, "_check_budget_keys", "graph.flow_checks")
        elif name == "pf_metaflow.sandbox.engine":
            cls = module.SandboxEngine
            _wrap(cls, "_open", "engine.open")
            _note_log(cls)
            _wrap(cls, "_ensure_schema", "engine.schema_check")
            _wrap(cls, "create", "engine.create")
            _wrap(cls, "release", "engine.release")
        elif name == "pf_metaflow.client":
            _wrap(module.EscrowClient, "__init__", "client.construct")
            _wrap(module, "default_client", "client.default_client")
        elif name == "metaflow.task":
            _wrap(module.MetaflowTask, "run_step", "hook.metaflow_run_step")
        elif name == "metaflow":
            _add("hook.metaflow_imported", 0.0, 0.0)
            _cpu_at["metaflow_imported"] = time.process_time()
        elif name == "sqlite3":
            _wrap(module, "connect", "sqlite3.connect")
        elif name.startswith("metaflow.plugins.metadata_providers."):
            # Each provider (local, service) has its own register_metadata.
            for value in list(vars(module).values()):
                if isinstance(value, type) and "register_metadata" in vars(value):
                    _wrap(value, "register_metadata", "metadata.register_metadata")

    _WATCH = ("pf_metaflow", "sqlite3", "metaflow.task", "metaflow.plugins.metadata_providers.")

    class _Loader(importlib.abc.Loader):
        def __init__(self, inner, fullname):
            self.inner, self.fullname = inner, fullname

        def create_module(self, spec):
            return self.inner.create_module(spec)

        def exec_module(self, module):
            outer = self.fullname.startswith("pf_metaflow") and _depth["import"] == 0
            if self.fullname.startswith("pf_metaflow"):
                _depth["import"] += 1
            c0, w0 = time.process_time(), time.perf_counter()
            try:
                self.inner.exec_module(module)
            finally:
                if self.fullname.startswith("pf_metaflow"):
                    _depth["import"] -= 1
                if outer:
                    _add("import.pf_metaflow", time.process_time() - c0, time.perf_counter() - w0)
            _patch(module)

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if not (fullname == "metaflow" or fullname.startswith(_WATCH)):
                return None
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            spec.loader = _Loader(spec.loader, fullname)
            return spec

    sys.meta_path.insert(0, _Finder())

    def _dump():
        try:
            os.makedirs(_OUT, exist_ok=True)
            with open(os.path.join(_OUT, f"{os.getpid()}.json"), "w") as fh:
                modules = sorted(m for m in sys.modules
                                 if m.startswith("pf_metaflow") or m in ("decimal", "sqlite3", "tenacity"))
                json.dump({"argv": sys.argv, "cpu": time.process_time(), "cpu_at": _cpu_at,
                           "wall": time.perf_counter() - _born,
                           "stats": _stats, "timeline": _timeline, "modules": modules}, fh)
        except OSError:
            pass

    atexit.register(_dump)
