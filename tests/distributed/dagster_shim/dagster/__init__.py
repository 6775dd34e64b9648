"""A stand-in for the ``dagster`` package, just enough to load a job file that
``metaflow-dagster`` generated and call its ops in order (tests only).

metaflow-dagster (on PyPI, installed by the ``distributed`` extra) compiles a flow into a
Python file of Dagster ops, each of which runs one Metaflow task as a subprocess with the
run id and task ids the orchestrator chose (``dagster-<12 hex>``, ``--task-id 1``).
Executing that file for real needs ``dagster`` itself, which is not installed here; the
ops' bodies (what Metaflow sees) do not depend on it, so the tests call them directly.
"""

from __future__ import annotations


def _decorator(*args, **kwargs):
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return args[0]  # @op / @job
    return lambda fn: fn  # @op(...) / @job(...)


op = job = sensor = graph = asset = _decorator


class _Anything:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __call__(self, *args, **kwargs):
        return _Anything(*args, **kwargs)

    def __getattr__(self, name):
        return _Anything()


class Output:
    """What a multi-output op yields: the value and the output it is for."""

    def __init__(self, value, output_name="result", **kwargs):
        self.value, self.output_name = value, output_name


DynamicOutput = Output
Config = _Anything
OpExecutionContext = SensorEvaluationContext = _Anything


def __getattr__(name):  # every other name the generated file imports (In, Out, MetadataValue, ...)
    return _Anything()
