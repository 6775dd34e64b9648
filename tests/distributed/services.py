"""Metaflow's production topology on 127.0.0.1, for the ``distributed`` tier.

- a **metadata service**: ``metaflow-local-service`` (a Metaflow metadata service that keeps
  its records under its own ``.metaflow/``), started as its daemon module directly with a
  ``HOME`` of its own, so its state file never lands in the user's ``~/.metaflow-local-service``;
- an **S3 endpoint**: moto's server mode (``python -m moto.server``), reached by Metaflow
  through ``METAFLOW_S3_ENDPOINT_URL`` with fake credentials;
- the **HTTP sandbox escrow** (``pf-metaflow sandbox serve``) as a separate service, with
  agents registered and funded through ``pf-metaflow sandbox register/faucet --db``: runs
  pay with their own key, never the built-in payer's.

Every process is started here and stopped here, by its own ``Popen`` handle. Nothing
reaches beyond loopback: the AWS variables point at moto, with no profile or instance
metadata to fall back on.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Iterator, Optional

BUCKET = "pf-metaflow-ci"
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
    raise RuntimeError(f"{process.args} did not answer {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@contextmanager
def _service(cmd: list[str], probe: str, log: Path, env: Optional[dict] = None,
             cwd: Optional[Path] = None) -> Iterator[subprocess.Popen]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, cwd=str(cwd) if cwd else None)
        try:
            _wait_http(probe, process, log)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PF_", "METAFLOW_", "AWS_"))}
    env.update(FAKE_AWS)
    env.update(extra)
    return env


@contextmanager
def running_s3(workdir: Path) -> Iterator[str]:
    """moto's S3 (server mode) on 127.0.0.1 with one bucket: yields its endpoint URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with _service(cmd, f"{url}/moto-api/", workdir / "moto.log", env=_clean_env(), cwd=workdir):
        import boto3

        s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        yield url


@contextmanager
def running_metadata_service(root: Path) -> Iterator[str]:
    """metaflow-local-service keeping its records under ``root/.metaflow``: yields its URL."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "metaflow_local_service.daemon", "--port", str(port),
           "--metaflow-root", str(root), "--idle-timeout", "3600"]
    # The daemon writes its state file (pid, port) under ~/.metaflow-local-service: a home of
    # its own keeps a test's service out of the user's.
    with _service(cmd, f"{url}/ping", root / "service.log", env=_clean_env(HOME=str(root)), cwd=root):
        yield url


@dataclass
class Agent:
    agent_id: str
    api_key: str


@dataclass
class Topology:
    """The three services, and the environment a Metaflow process needs to use them."""

    s3_url: str
    service_url: str
    service_root: Path
    escrow_url: str
    escrow_db: Path
    bucket: str = BUCKET
    logs: list = field(default_factory=list)

    @property
    def sysroot(self) -> str:
        return f"s3://{self.bucket}/metaflow"

    def env(self, api_key: Optional[str] = None, *, escrow: bool = True) -> dict:
        """Metaflow on the service and S3; escrow over HTTP with ``api_key`` (unless ``escrow=False``)."""
        env = dict(FAKE_AWS)
        env.update(
            METAFLOW_DEFAULT_METADATA="service",
            METAFLOW_SERVICE_URL=self.service_url,
            METAFLOW_DEFAULT_DATASTORE="s3",
            METAFLOW_DATASTORE_SYSROOT_S3=self.sysroot,
            METAFLOW_DATATOOLS_S3ROOT=f"s3://{self.bucket}/data",
            METAFLOW_CARD_S3ROOT=f"s3://{self.bucket}/metaflow/mf.cards",
            METAFLOW_S3_ENDPOINT_URL=self.s3_url,
            METAFLOW_SERVICE_VERSION_CHECK="0",
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
        )
        if escrow:
            env["PF_ESCROW_URL"] = self.escrow_url
            if api_key:
                env["PF_API_KEY"] = api_key
        return env

    # -- the escrow service's own records (never our ledger's word for it) ------------------

    def _cli(self, *args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "pf_metaflow", "sandbox", *args, "--db", str(self.escrow_db)],
                              capture_output=True, text=True, timeout=60, env=_clean_env())
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    def new_agent(self, name: str, fund: Optional[str] = None) -> Agent:
        data = json.loads(self._cli("register", f"{name}{uuid.uuid4().hex[:6]}", "--json").stdout)
        agent = Agent(data["agent_id"], data["api_key"])
        if fund is not None:
            self._cli("faucet", agent.agent_id, "--amount", fund)
        return agent

    def balances(self) -> dict:
        data = json.loads(self._cli("balance", "--json").stdout)
        return {a: {k: Decimal(v) for k, v in b.items()} for a, b in data["agents"].items()}

    def wallet(self, agent: Agent) -> dict:
        return self.balances().get(agent.agent_id, {"usdc": Decimal(0), "locked": Decimal(0)})

    def check_conservation(self) -> None:
        self._cli("check")

    def s3_keys(self, prefix: str = "") -> list[str]:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.s3_url, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        keys: list[str] = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend(o["Key"] for o in page.get("Contents", ()))
        return keys

    def s3_get(self, key: str) -> bytes:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.s3_url, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        return s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()


@contextmanager
def running_topology(workdir: Path) -> Iterator[Topology]:
    """Metadata service + S3 endpoint + HTTP sandbox escrow, all on loopback, for one block."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from conftest import running_sandbox_server  # tests/conftest.py

    with running_s3(workdir / "s3") as s3_url, \
            running_metadata_service(workdir / "metadata-service") as service_url, \
            running_sandbox_server(workdir / "escrow" / "escrow.db") as escrow:
        yield Topology(s3_url=s3_url, service_url=service_url, service_root=workdir / "metadata-service",
                       escrow_url=escrow.url, escrow_db=escrow.db)


def tempdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


# -- driving Metaflow and pf-metaflow on the topology from a test ----------------------------


def process_env(topo: Topology, api_key: Optional[str] = None, **extra: str) -> dict:
    """A child process's environment on ``topo``: this process's, less every ``PF_``,
    ``METAFLOW_`` and ``AWS_`` setting, plus the topology's (escrow over HTTP with
    ``api_key``) and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PF_", "METAFLOW_", "AWS_"))}
    env.update(METAFLOW_USER="pf-tester", PYTHONUNBUFFERED="1")
    env.update(topo.env(api_key))
    env.update(extra)
    return env


def pf_cli(topo: Topology, cwd: Path, *args: str, key: Optional[str] = None,
           timeout: float = 300) -> subprocess.CompletedProcess:
    """``pf-metaflow ARGS`` reading runs through the metadata service and S3 (escrow with ``key``)."""
    return subprocess.run([sys.executable, "-m", "pf_metaflow", *args], cwd=cwd, env=process_env(topo, key),
                          capture_output=True, text=True, timeout=timeout)


def service_get(topo: Topology, path: str) -> tuple[int, object]:
    """``GET`` the metadata service's REST API at ``path``: (HTTP status, decoded JSON or text)."""
    import urllib.error

    try:
        with urllib.request.urlopen(f"{topo.service_url}/{path.lstrip('/')}", timeout=30) as r:
            body, status = r.read(), r.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read(), exc.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")
