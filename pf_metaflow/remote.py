"""The remote-compute guard: a paid step sent off this machine needs a shared escrow and shared metadata.

A paid step under ``@kubernetes``, ``@batch`` (or any decorator whose task runs
elsewhere: Metaflow's "trampoline" compute backends, extensions included) is refused
when Metaflow checks the flow, before any task runs, if

- the escrow is the **embedded sandbox** (``PF_ESCROW_URL`` unset or ``sandbox:…``):
  each pod or container would lock and release in a fresh sandbox file of its own,
  "payments" nobody else can see or reconcile; or
- the metadata is **local**: a remote task's metadata reaches the datastore only when
  the task ends, so a pod killed for memory loses the record of the escrow it locked
  (docs/design.md, settlement rules 1 and 5 rely on that record).

Compiling a deployment (``argo-workflows create``, ``step-functions create``, …) does
not look at ``PF_ESCROW_URL``: the pods read theirs when they run (and their own
``step_init`` checks it again there). Local metadata is refused there too.

Called from ``@pf_escrow_step``'s ``step_init`` (:func:`check`); nothing here runs per task.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Optional

from metaflow.exception import MetaflowException

# Metaflow's own remote compute backends; extensions add theirs as "trampoline" CLIs.
KNOWN_REMOTE = frozenset({"kubernetes", "batch"})
# Subcommands that compile a deployment: its tasks run later, elsewhere, with the environment
# the deployment gives them (every other command, `check` included, is judged as a run).
DEPLOY_COMMANDS = frozenset({"argo-workflows", "step-functions", "airflow", "dagster",
                             "kubeflow-pipelines", "kubeflow", "prefect", "flyte"})


class PfRemoteComputeError(MetaflowException):
    headline = "pf-metaflow: this paid step cannot run on remote compute as configured"


def remote_decorators(decorators: Iterable[Any]) -> list[str]:
    """Names of the decorators in ``decorators`` that send the task off this machine."""
    names = set(KNOWN_REMOTE)
    try:
        from metaflow.plugins import get_trampoline_cli_names

        names |= set(get_trampoline_cli_names())
    except Exception:  # noqa: BLE001 - older Metaflow: the known ones only
        pass
    out = []
    for deco in decorators:
        name = getattr(deco, "name", None)
        if name in names and name not in out:
            out.append(name)
    return out


def check(step_name: str, decorators: Iterable[Any], *, billed: bool = True,
          metadata_type: Optional[str] = None, command: Optional[str] = None,
          escrow_url: Optional[str] = None) -> None:
    """Refuse a billed step on remote compute with the embedded sandbox or local metadata.

    ``metadata_type``, ``command`` and ``escrow_url`` default to what this process was
    started with (Metaflow's ``--metadata``, its subcommand, ``$PF_ESCROW_URL``).
    Raises :class:`PfRemoteComputeError` (one line, no traceback) naming what to use instead.
    """
    if not billed:
        return
    remote = remote_decorators(decorators)
    if not remote:
        return
    where = " and ".join(f"@{n}" for n in remote)
    metadata_type = metadata_type or current_metadata_type()
    if metadata_type == "local":
        raise PfRemoteComputeError(
            f"step *{step_name}* is paid (@pf_escrow_step) and runs on {where}, but Metaflow's "
            "metadata is local: a remote task's metadata reaches the datastore only when the task "
            "ends, so a task killed on the way (out of memory, node lost) would lose the record of "
            "the escrow it locked and nothing could settle it. Use a metadata service "
            "(--metadata service with METAFLOW_SERVICE_URL, or METAFLOW_DEFAULT_METADATA=service)."
        )
    command = command if command is not None else current_command()
    if command in DEPLOY_COMMANDS:
        return  # compiling a deployment: its pods read PF_ESCROW_URL when they run
    url = (escrow_url if escrow_url is not None else os.environ.get("PF_ESCROW_URL", "")).strip()
    if not url or url.lower().startswith("sandbox:"):
        shown = "PF_ESCROW_URL is unset" if not url else "PF_ESCROW_URL names a sandbox: file"
        raise PfRemoteComputeError(
            f"step *{step_name}* is paid (@pf_escrow_step) and runs on {where}, but the escrow is "
            f"the embedded sandbox ({shown}): every remote task would lock and pay in a private "
            "sandbox database of its own that no one else sees or reconciles. Point PF_ESCROW_URL "
            "(and PF_API_KEY) at an escrow service the remote tasks can reach: a `pf-metaflow "
            "sandbox serve` on a reachable host, or the live service https://escrow.purpleflea.com; "
            "give the key to the tasks with @secrets or METAFLOW_KUBERNETES_SECRETS (docs/deploy.md)."
        )


def current_metadata_type() -> Optional[str]:
    """The metadata provider this Metaflow process uses ("local", "service", …)."""
    try:
        from metaflow.system_context import system_context

        provider = system_context.metadata
        if provider is not None and getattr(provider, "TYPE", None):
            return provider.TYPE
    except Exception:  # noqa: BLE001 - Metaflow before system_context
        pass
    ctx = _click_context()
    while ctx is not None:
        provider = getattr(getattr(ctx, "obj", None), "metadata", None)
        if provider is not None and getattr(provider, "TYPE", None):
            return provider.TYPE
        ctx = ctx.parent
    try:
        from metaflow.metaflow_config import DEFAULT_METADATA

        return DEFAULT_METADATA
    except Exception:  # noqa: BLE001
        return None


def current_command() -> Optional[str]:
    """The Metaflow subcommand this process runs (``run``, ``step``, ``argo-workflows``, …)."""
    ctx = _click_context()
    while ctx is not None:
        saved = getattr(ctx, "saved_args", None)
        if saved:
            return str(saved[0])
        ctx = ctx.parent
    return None  # not known: treated as a run (the escrow is checked)


def _click_context():
    try:
        from metaflow._vendor import click

        return click.get_current_context(silent=True)
    except Exception:  # noqa: BLE001
        return None


def package_contents() -> list:
    """What a paid flow's code package must carry for its remote tasks: ``pf_metaflow`` itself.

    Metaflow's code package holds the flow's directory and the ``metaflow_extensions``
    packages it knows about (``metaflow_extensions/pf_metaflow`` registers the decorator),
    not the ``pf_metaflow`` library they import: a pod started from the default image would
    fail on ``import pf_metaflow``. Returned by ``@pf_escrow_step``'s ``add_to_package``,
    this adds the library's files next to Metaflow's own in the package (``CODE_CONTENT``:
    the directory remote tasks put on ``PYTHONPATH``). Not ``MODULE_CONTENT``: Metaflow
    2.19 packages a regular package given that way as its ``__init__.py`` alone.
    The library's own dependencies (``requests``, ``tenacity``, ``werkzeug``) must be in the
    image: Metaflow's default image has ``requests`` only (docs/deploy.md).
    """
    try:
        from metaflow.packaging_sys import ContentType
    except ImportError:  # Metaflow before packaging_sys: the image must carry pf-metaflow
        return []
    root = os.path.dirname(os.path.abspath(__file__))
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py") or name == "py.typed":
                path = os.path.join(folder, name)
                arcname = os.path.join("pf_metaflow", os.path.relpath(path, root))
                out.append((path, arcname, ContentType.CODE_CONTENT))
    return out
