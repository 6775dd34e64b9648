"""The distributed tier's pytest fixtures, shared by its test modules.

Loaded as a plugin by ``tests/conftest.py`` (``pytest_plugins``), so every module of the
tier gets them by name. Importing this needs none of the ``distributed`` extra: the fixture
skips its test when the extra is missing.
"""

from __future__ import annotations

import time

import pytest


@pytest.fixture(scope="module")
def topo(tmp_path_factory):
    """One running topology (metadata service, S3 endpoint, HTTP sandbox) per test module."""
    for module in ("metaflow_local_service", "moto", "boto3"):
        pytest.importorskip(module, reason="the distributed tier needs pip install -e '.[distributed]'")
    from distributed.services import running_topology

    started = time.monotonic()
    with running_topology(tmp_path_factory.mktemp("topology")) as topology:
        print(f"topology up in {time.monotonic() - started:.1f} s: {topology}")
        yield topology
