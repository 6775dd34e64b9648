"""Paid flows on Metaflow's production topology, on one machine (the ``distributed`` tier).

``pytest -m distributed`` (excluded from the default run, like ``slow``). One set of real
servers for the module, all on 127.0.0.1 (tests/distributed/services.py):

- a Metaflow **metadata service** (``metaflow-local-service``),
- an **S3 endpoint** (moto's server mode, ``METAFLOW_S3_ENDPOINT_URL``, fake credentials),
- the **HTTP sandbox escrow** as a service of its own; each test registers and funds its own
  payer (and payee) with ``pf-metaflow sandbox register/faucet --db`` and runs with that key.

What it covers (issue 12): (1) the shipped flows on that topology, ledger/reconcile through the
service, a SIGKILLed paid task settled, artifacts and cards in S3; (2) the remote-compute guard;
(3) Argo Workflows and Step Functions compiles with no key and no sandbox payee; (4) a paid task
run from the code package in a fresh environment; (5) paid flows compiled by metaflow-dagster
(``dagster create``) and run by the real ``dagster job execute``, under local metadata, paying
over the HTTP sandbox: orchestrator-chosen ids (``dagster-<12 hex>``, ``--task-id 1``), every
paid task in the ledger, a SIGKILLed one settled by ``reconcile``.
Money is read from the escrow service's balances, never from our ledger's word for it.
Needs the ``distributed`` extra (``pip install -e ".[test,distributed]"``): metaflow-local-service,
moto[server], boto3, kubernetes, metaflow-dagster, dagster. The tests without the ``distributed``
marker (the guard's logic, Parameter defaults) need none of it and run in the default tier.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent
FLOWS = REPO / "flows"
TESTFLOWS = Path(__file__).parent / "flows"
FEE = Decimal("0.01")

distributed = pytest.mark.distributed


# ---------------------------------------------------------------------------------------
# The topology (one per module) and running flows on it


@pytest.fixture
def payer(topo):
    return topo.new_agent("payer", fund="100")


@pytest.fixture
def worker(topo):
    return topo.new_agent("worker")


def _env(topo, extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PF_", "METAFLOW_", "AWS_"))}
    env.update(METAFLOW_USER="pf-tester", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_flow(topo, cwd: Path, flow: Path, *args: str, key=None, escrow=True, top=("--datastore", "s3",
             "--metadata", "service"), command="run", extra_env=None, timeout=600) -> SimpleNamespace:
    """``python FLOW --no-pylint TOP... COMMAND --run-id-file F ARGS...`` on the topology."""
    run_id_file = cwd / f".run-id-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, str(flow), "--no-pylint", *top, command]
    if command in ("run", "resume"):
        cmd += ["--run-id-file", str(run_id_file)]
    cmd += list(args)
    env = _env(topo, {**topo.env(key, escrow=escrow), **(extra_env or {})})
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    run_id = run_id_file.read_text().strip() if run_id_file.exists() else None
    return SimpleNamespace(rc=proc.returncode, out=proc.stdout + "\n" + proc.stderr, run_id=run_id,
                           seconds=time.monotonic() - started)


def pf(topo, cwd: Path, *args: str, key=None) -> subprocess.CompletedProcess:
    """``pf-metaflow ARGS`` reading runs through the metadata service and S3."""
    return subprocess.run([sys.executable, "-m", "pf_metaflow", *args], cwd=cwd,
                          env=_env(topo, topo.env(key)), capture_output=True, text=True, timeout=300)


def ledger_json(topo, cwd: Path, pathspec: str, key=None) -> dict:
    proc = pf(topo, cwd, "ledger", pathspec, "--json", key=key)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def client_ledger(topo, cwd: Path, pathspec: str) -> dict:
    """``pf_metaflow.read_run`` and ``Run(...).data.pf_ledger`` through the Metaflow client."""
    code = (
        "import json, sys, pf_metaflow\n"
        "from metaflow import Run, namespace\n"
        "namespace(None)\n"
        f"run = Run({pathspec!r})\n"
        "reading = pf_metaflow.read_run(run)\n"
        "print(json.dumps({'entries': reading.entries, 'complete': reading.complete,\n"
        "                  'unseen': reading.unseen, 'artifact': run.data.pf_ledger}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_env(topo, topo.env()),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_no_local_metaflow(cwd: Path) -> None:
    """Nothing of the run was kept on this machine's disk: metadata and data are on the services."""
    local = cwd / ".metaflow"
    runs = [p for p in local.rglob("*") if p.is_dir() and p.parent.parent == local] if local.exists() else []
    assert not runs, f"runs kept locally instead of on the services: {runs}"


# ---------------------------------------------------------------------------------------
# 1. The production topology: the ML pipeline, ledger, reconcile, kill


@distributed
def test_ml_pipeline_pays_exactly_12_through_metadata_service_s3_and_http_sandbox(topo, tmp_path, payer, worker):
    run = run_flow(topo, tmp_path, FLOWS / "ml_pipeline_with_payments.py", "--agent_wallet", worker.agent_id,
                   key=payer.api_key)
    assert run.rc == 0, run.out
    assert "RESULT: OK" in run.out
    pathspec = f"MLPipelineWithPayments/{run.run_id}"

    # What moved on the escrow service: exactly 12.00 from the payer, 11.88 to the agent.
    assert topo.wallet(payer) == {"usdc": Decimal("88.000000"), "locked": Decimal("0.000000")}
    assert topo.wallet(worker)["usdc"] == Decimal("11.880000")
    topo.check_conservation()

    # The ledger, read back through the metadata service (CLI and client), says the same.
    ledger = ledger_json(topo, tmp_path, pathspec)
    assert ledger["complete"] is True and ledger["unseen"] == []
    assert ledger["totals"]["released"] == "12.000000"
    assert ledger["totals"]["net_paid"] == "11.880000"
    assert ledger["totals"]["fees"] == "0.120000"
    assert {e["step"] for e in ledger["entries"]} == {"ingest", "train", "evaluate", "deploy"}
    assert all(e["status"] == "released" and e["recipient"] == worker.agent_id for e in ledger["entries"])
    read = client_ledger(topo, tmp_path, pathspec)
    assert read["complete"] is True, read["unseen"]
    assert sorted(e["escrow_id"] for e in read["entries"]) == sorted(e["escrow_id"] for e in ledger["entries"])
    assert sorted(e["escrow_id"] for e in read["artifact"]) == sorted(e["escrow_id"] for e in ledger["entries"])

    # Nothing left to settle; reconcile reads the run through the service and agrees.
    rec = pf(topo, tmp_path, "reconcile", pathspec, key=payer.api_key)
    assert rec.returncode == 0, rec.stdout + rec.stderr
    assert "nothing to do" in rec.stdout + rec.stderr

    # The run is registered with the metadata service, its artifacts and cards are in S3,
    # and nothing of it was kept on this machine's disk.
    flow_dir = topo.service_root / ".metaflow" / "MLPipelineWithPayments" / run.run_id
    assert flow_dir.is_dir(), f"the metadata service holds no record of {pathspec}"
    keys = topo.s3_keys("metaflow/MLPipelineWithPayments/")
    assert any(k.startswith("metaflow/MLPipelineWithPayments/data/") for k in keys)
    assert any(f"/{run.run_id}/end/" in k for k in keys), "no task metadata of the run in S3"
    cards = [k for k in topo.s3_keys("metaflow/mf.cards/") if "MLPipelineWithPayments" in k]
    assert cards, "no card of the run in S3"
    assert_no_local_metaflow(tmp_path)
    print(f"ML pipeline on the topology: {run.seconds:.1f} s")


@distributed
def test_a_sigkilled_paid_task_is_found_through_the_service_and_settled_by_reconcile(topo, tmp_path, payer):
    run = run_flow(topo, tmp_path, TESTFLOWS / "kill_flow.py", key=payer.api_key)
    assert run.rc != 0, run.out
    pathspec = f"KillFlow/{run.run_id}"
    assert topo.wallet(payer) == {"usdc": Decimal("97.500000"), "locked": Decimal("2.500000")}

    ledger = ledger_json(topo, tmp_path, pathspec)
    assert [(e["step"], e["status"], e["amount_usdc"]) for e in ledger["entries"]] == [("work", "locked", "2.500000")]

    dry = pf(topo, tmp_path, "reconcile", pathspec, "--dry-run", key=payer.api_key)
    assert dry.returncode == 1, dry.stdout + dry.stderr  # something to settle, nothing moved
    assert topo.wallet(payer)["locked"] == Decimal("2.500000")

    rec = pf(topo, tmp_path, "reconcile", pathspec, key=payer.api_key)
    assert rec.returncode == 0, rec.stdout + rec.stderr
    assert "refunded" in rec.stdout
    assert topo.wallet(payer) == {"usdc": Decimal("100.000000"), "locked": Decimal("0.000000")}
    topo.check_conservation()

    again = pf(topo, tmp_path, "reconcile", pathspec, key=payer.api_key)
    assert again.returncode == 0 and "nothing to do" in again.stdout + again.stderr
    after = ledger_json(topo, tmp_path, pathspec)
    assert [e["status"] for e in after["entries"]] == ["refunded"]
    assert after["complete"] is True


@distributed
@pytest.mark.parametrize("flow, args, paid", [
    ("training_bounty.py", (), "3.000000"),
    ("data_ingest.py", (), "1.500000"),
    ("batch_shards.py", ("--num_shards", "3"), None),
], ids=["training_bounty", "data_ingest", "batch_shards"])
def test_every_shipped_flow_runs_on_the_topology_and_its_ledger_matches_the_service(
        topo, tmp_path, payer, worker, flow, args, paid):
    run = run_flow(topo, tmp_path, FLOWS / flow, "--agent_wallet", worker.agent_id, *args, key=payer.api_key)
    assert run.rc == 0, run.out
    name = next(line.split("executing ", 1)[1].split(" for user:")[0]
                for line in run.out.splitlines() if "executing " in line and " for user:" in line)
    ledger = ledger_json(topo, tmp_path, f"{name}/{run.run_id}")
    assert ledger["complete"] is True, ledger["unseen"]
    released = Decimal(ledger["totals"]["released"])
    if paid is not None:
        assert released == Decimal(paid)
    assert released > 0
    # The service moved exactly what the ledger says.
    assert topo.wallet(payer) == {"usdc": Decimal("100") - released, "locked": Decimal("0.000000")}
    assert topo.wallet(worker)["usdc"] == Decimal(ledger["totals"]["net_paid"])
    assert_no_local_metaflow(tmp_path)


# ---------------------------------------------------------------------------------------
# 2. The remote-compute guard, at graph time


REMOTE_FLOW = '''
from metaflow import FlowSpec, step, {deco}
from pf_metaflow import pf_escrow_step


class {name}(FlowSpec):
    @step
    def start(self):
        self.next(self.work)

    @{deco}{deco_args}
    @pf_escrow_step(agent_wallet="ag_sandbox_worker", amount_usdc="1.00")
    @step
    def work(self):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    {name}()
'''


def remote_flow(tmp_path: Path, deco: str) -> tuple[Path, str]:
    name = f"Remote{deco.capitalize()}PaidFlow"
    args = "(cpu=1)" if deco == "kubernetes" else "(cpu=1, queue='pf-ci-queue')"
    path = tmp_path / f"{name.lower()}.py"
    path.write_text(REMOTE_FLOW.format(deco=deco, deco_args=args, name=name))
    return path, name


def registered_runs(topo, name: str) -> set:
    flow_dir = topo.service_root / ".metaflow" / name
    return {p.name for p in flow_dir.iterdir() if p.is_dir()} if flow_dir.is_dir() else set()


def assert_refused_before_any_task(topo, run, name: str, runs_before: set = frozenset()) -> None:
    assert run.rc == 1, run.out
    assert "Task is starting" not in run.out
    assert "pf-metaflow: this paid step cannot run on remote compute" in run.out
    assert "Traceback" not in run.out
    assert run.run_id is None
    assert registered_runs(topo, name) == set(runs_before), "a run was registered"


@distributed
@pytest.mark.parametrize("deco", ["kubernetes", "batch"])
def test_a_paid_remote_step_with_the_embedded_sandbox_is_refused_before_any_task_runs(topo, tmp_path, deco):
    pytest.importorskip("kubernetes", reason="@kubernetes needs the kubernetes package")
    flow, name = remote_flow(tmp_path, deco)
    before = topo.balances()
    run = run_flow(topo, tmp_path, flow, escrow=False)
    assert_refused_before_any_task(topo, run, name)
    assert f"runs on @{deco}" in run.out
    assert "embedded sandbox" in run.out and "PF_ESCROW_URL is unset" in run.out
    assert "pf-metaflow sandbox serve" in run.out and "https://escrow.purpleflea.com" in run.out
    assert not (tmp_path / ".pf_sandbox").exists(), "the embedded sandbox was opened"
    assert topo.balances() == before


@distributed
def test_with_kubernetes_on_the_command_line_is_refused_too(topo, tmp_path):
    before = registered_runs(topo, "KillFlow")
    run = run_flow(topo, tmp_path, TESTFLOWS / "kill_flow.py", "--with", "kubernetes", escrow=False)
    assert_refused_before_any_task(topo, run, "KillFlow", before)
    assert "step work is paid" in run.out.replace("*", "")


@distributed
def test_a_paid_remote_step_with_local_metadata_is_refused_before_any_task_runs(topo, tmp_path, payer):
    pytest.importorskip("kubernetes", reason="@kubernetes needs the kubernetes package")
    flow, name = remote_flow(tmp_path, "kubernetes")
    run = run_flow(topo, tmp_path, flow, key=payer.api_key, top=("--datastore", "s3", "--metadata", "local"))
    assert_refused_before_any_task(topo, run, name)
    assert "metadata is local" in run.out and "--metadata service" in run.out
    assert not (tmp_path / ".metaflow" / name).exists()


@distributed
def test_a_paid_remote_step_with_a_shared_escrow_and_the_service_passes_the_check(topo, tmp_path, payer):
    pytest.importorskip("kubernetes", reason="@kubernetes needs the kubernetes package")
    flow, _ = remote_flow(tmp_path, "kubernetes")
    check = run_flow(topo, tmp_path, flow, key=payer.api_key, command="check")
    assert check.rc == 0, check.out


# ---------------------------------------------------------------------------------------
# 3. Deployments: Argo Workflows compiles whatever PF_ESCROW_URL says, and bakes in no secret


def _argo_json(topo, tmp_path: Path, flow: Path, key: str, extra_env: dict) -> dict:
    out = tmp_path / "workflow.json"
    env = _env(topo, {**topo.env(key), **extra_env})
    with open(out, "w") as fh:
        proc = subprocess.run([sys.executable, str(flow), "--no-pylint", "--datastore", "s3", "--metadata",
                               "service", "argo-workflows", "create", "--only-json"], cwd=tmp_path, env=env,
                              stdout=fh, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr + out.read_text()[-2000:]
    text = out.read_text()
    return {"text": text, "doc": json.loads(text[text.index("{"):]), "stderr": proc.stderr}


def _without_descriptions(value):
    """The workflow minus help texts (a Parameter's help may mention the sandbox worker)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k == "description":
                continue
            if k == "metaflow/parameters" and isinstance(v, str):
                v = {n: {a: b for a, b in p.items() if a != "description"} for n, p in json.loads(v).items()}
            out[k] = _without_descriptions(v)
        return out
    if isinstance(value, list):
        return [_without_descriptions(v) for v in value]
    return value


def _key_forms(key: str) -> list[str]:
    raw = key.encode()
    forms = {key}
    for shift in range(3):
        forms.add(base64.b64encode(b"x" * shift + raw).decode()[4:-4])
    return sorted(forms)


LIVE = {"PF_ESCROW_URL": "https://escrow.purpleflea.com",
        # Any attempt to reach the live service (there must be none) goes nowhere.
        "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}


@distributed
@pytest.mark.parametrize("escrow", ["live", "sandbox-server", "embedded"])
def test_the_ml_pipeline_compiles_for_argo_with_no_key_and_no_sandbox_payee(topo, tmp_path, escrow):
    pytest.importorskip("kubernetes", reason="argo-workflows create needs the kubernetes package")
    key = "pf_live_" + uuid.uuid4().hex  # a fake key: never sent anywhere
    extra = {"live": LIVE, "sandbox-server": {}, "embedded": {"PF_ESCROW_URL": ""}}[escrow]
    extra = {**extra, "METAFLOW_KUBERNETES_SECRETS": "purpleflea-escrow"}
    wf = _argo_json(topo, tmp_path, FLOWS / "ml_pipeline_with_payments.py", key, extra)
    text = wf["text"] + wf["stderr"]
    for form in _key_forms(key):
        assert form not in text, "the API key is in the compiled workflow"
    assert "PF_API_KEY" not in wf["text"]
    stripped = json.dumps(_without_descriptions(wf["doc"]))
    assert "ag_sandbox_" not in stripped, "a sandbox payee is baked into the workflow"
    params = {p["name"]: p.get("value") for p in wf["doc"]["spec"]["arguments"]["parameters"]}
    assert params["agent_wallet"] == '""'  # no payee: given at trigger time
    assert params["total_budget_usdc"] == '"12.00"'
    # The key reaches pods from the cluster secret named at compile time, by reference only.
    refs = {e["secretRef"]["name"] for t in wf["doc"]["spec"]["templates"]
            for e in (t.get("container") or {}).get("envFrom", []) if "secretRef" in e}
    assert refs == {"purpleflea-escrow"}


# ---------------------------------------------------------------------------------------
# The guard's logic, without any server (default tier)


class _Deco(SimpleNamespace):
    pass


def _check(*names, **kwargs):
    from pf_metaflow import remote

    return remote.check("work", [_Deco(name=n) for n in names], **kwargs)


def test_guard_ignores_local_steps_and_unpaid_steps():
    _check("retry", "catch", metadata_type="local", command="run", escrow_url="")
    _check("kubernetes", billed=False, metadata_type="local", command="run", escrow_url="")


@pytest.mark.parametrize("deco", ["kubernetes", "batch"])
@pytest.mark.parametrize("url", ["", "sandbox:", "sandbox:///tmp/x.db"])
def test_guard_refuses_remote_compute_on_the_embedded_sandbox(deco, url):
    from pf_metaflow.remote import PfRemoteComputeError

    with pytest.raises(PfRemoteComputeError) as err:
        _check(deco, metadata_type="service", command="run", escrow_url=url)
    assert "embedded sandbox" in str(err.value) and f"@{deco}" in str(err.value)


def test_guard_refuses_remote_compute_with_local_metadata_even_when_compiling():
    from pf_metaflow.remote import PfRemoteComputeError

    for command in ("run", "argo-workflows", "step"):
        with pytest.raises(PfRemoteComputeError, match="metadata is local"):
            _check("kubernetes", metadata_type="local", command=command, escrow_url="https://escrow.purpleflea.com")


def test_guard_lets_a_deployment_compile_whatever_the_escrow_url_and_passes_a_shared_escrow():
    _check("kubernetes", metadata_type="service", command="argo-workflows", escrow_url="")
    _check("kubernetes", metadata_type="service", command="step-functions", escrow_url="")
    _check("kubernetes", metadata_type="service", command="run", escrow_url="http://10.0.0.5:8765")
    _check("batch", metadata_type="service", command="step", escrow_url="https://escrow.purpleflea.com")


def test_agent_wallet_default_bakes_no_payee_into_a_deployment(monkeypatch):
    from pf_metaflow.params import sandbox_or_required_agent

    for url in ("", "https://escrow.purpleflea.com", "http://127.0.0.1:8765"):
        monkeypatch.setenv("PF_ESCROW_URL", url)
        assert sandbox_or_required_agent(None, deploy_time=True) == ""
    monkeypatch.delenv("PF_ESCROW_URL")
    assert sandbox_or_required_agent(None) == "ag_sandbox_worker"  # a run on the sandbox


def _moto_batch_queue(topo) -> dict:
    """A managed (Fargate) Batch compute environment and job queue in moto: what
    `step-functions create` looks up. Returns the environment Metaflow needs for it."""
    import boto3

    kw = dict(endpoint_url=topo.s3_url, aws_access_key_id="testing", aws_secret_access_key="testing",
              region_name="us-east-1")
    name = "pf-" + uuid.uuid4().hex[:8]
    role = boto3.client("iam", **kw).create_role(RoleName=name, AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    ec2 = boto3.client("ec2", **kw)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.0.0/24")["Subnet"]["SubnetId"]
    group = ec2.create_security_group(GroupName=name, Description=name, VpcId=vpc)["GroupId"]
    batch = boto3.client("batch", **kw)
    ce = batch.create_compute_environment(
        computeEnvironmentName=name, type="MANAGED", state="ENABLED", serviceRole=role,
        computeResources={"type": "FARGATE", "maxvCpus": 4, "subnets": [subnet], "securityGroupIds": [group]})
    batch.create_job_queue(jobQueueName=name, state="ENABLED", priority=1,
                           computeEnvironmentOrder=[{"order": 1, "computeEnvironment": ce["computeEnvironmentArn"]}])
    return {"AWS_ENDPOINT_URL_SFN": topo.s3_url, "AWS_ENDPOINT_URL_BATCH": topo.s3_url,
            "AWS_ENDPOINT_URL_IAM": topo.s3_url, "METAFLOW_BATCH_JOB_QUEUE": name,
            "METAFLOW_SFN_IAM_ROLE": role, "METAFLOW_ECS_S3_ACCESS_IAM_ROLE": role,
            "METAFLOW_ECS_FARGATE_EXECUTION_ROLE": role, "METAFLOW_SFN_DYNAMO_DB_TABLE": name}


@distributed
def test_batch_shards_compiles_for_step_functions_with_no_key_and_no_sandbox_payee(topo, tmp_path):
    key = "pf_live_" + uuid.uuid4().hex
    env = _env(topo, {**topo.env(key), **LIVE, **_moto_batch_queue(topo)})
    proc = subprocess.run([sys.executable, str(FLOWS / "batch_shards.py"), "--no-pylint", "--datastore", "s3",
                           "--metadata", "service", "step-functions", "create", "--only-json"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    for form in _key_forms(key):
        assert form not in proc.stdout + proc.stderr, "the API key is in the compiled state machine"
    doc = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert "ag_sandbox_" not in json.dumps(doc)
    text = json.dumps(doc)
    found = [e for e in _walk(doc) if isinstance(e, dict) and e.get("Name") == "METAFLOW_DEFAULT_PARAMETERS"]
    assert found, "no METAFLOW_DEFAULT_PARAMETERS in the state machine"
    defaults = json.loads(found[0]["Value"])
    assert defaults["agent_wallet"] == ""  # no payee baked in: given at trigger time
    assert "PF_API_KEY" not in text


def _walk(value):
    yield value
    if isinstance(value, dict):
        for v in value.values():
            yield from _walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v)


# ---------------------------------------------------------------------------------------
# 4. The library travels with the flow: a paid task run from the code package, as a pod would


POD_FLOW = '''
from metaflow import FlowSpec, Parameter, step
from pf_metaflow import pf_escrow_step


class PodPaidFlow(FlowSpec):
    agent_wallet = Parameter("agent_wallet", default="")

    @step
    def start(self):
        self.next(self.work)

    @pf_escrow_step(agent_wallet="agent_wallet", amount_usdc="1.00")
    @step
    def work(self):
        import pf_metaflow
        self.where = pf_metaflow.__file__
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    PodPaidFlow()
'''


@pytest.fixture(scope="module")
def pod_python(tmp_path_factory):
    """A fresh virtual environment with Metaflow (and so requests, boto3) and tenacity: no pf_metaflow."""
    venv = tmp_path_factory.mktemp("pod") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    import metaflow

    version = metaflow.__version__ if hasattr(metaflow, "__version__") else None
    spec = f"metaflow=={version}" if version else "metaflow"
    proc = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", spec, "tenacity"],
                          capture_output=True, text=True, timeout=600, cwd=venv.parent)
    if proc.returncode != 0:
        pytest.skip(f"could not build the pod's environment: {proc.stderr[-500:]}")
    python = venv / "bin" / "python"
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    check = subprocess.run([str(python), "-c", "import pf_metaflow"], capture_output=True, text=True,
                           cwd=venv.parent, env=clean)
    assert check.returncode != 0, "the pod's environment must not have pf_metaflow installed"
    return python


@distributed
def test_a_paid_task_runs_from_the_code_package_in_a_fresh_environment(topo, tmp_path, payer, worker, pod_python):
    pytest.importorskip("kubernetes", reason="argo-workflows create needs the kubernetes package")
    import io
    import tarfile

    src = tmp_path / "src"
    src.mkdir()
    flow = src / "pod_paid_flow.py"
    flow.write_text(POD_FLOW)
    wf = _argo_json(topo, src, flow, payer.api_key, {"METAFLOW_KUBERNETES_SECRETS": "purpleflea-escrow"})
    env = {e["name"]: e.get("value") for t in wf["doc"]["spec"]["templates"]
           for e in (t.get("container") or {}).get("env", [])}
    url = env["METAFLOW_CODE_URL"]
    bucket, key = url[len("s3://"):].split("/", 1)
    assert bucket == topo.bucket
    blob = topo.s3_get(key)
    names = tarfile.open(fileobj=io.BytesIO(blob)).getnames()
    assert any(n.endswith("pf_metaflow/__init__.py") for n in names), "the package lacks pf_metaflow"

    # The pod: the package unpacked in an empty directory, run with an interpreter that has no pf_metaflow.
    pod = tmp_path / "pod"
    pod.mkdir()
    tarfile.open(fileobj=io.BytesIO(blob)).extractall(pod)
    pod_env = _env(topo, topo.env(payer.api_key))
    pod_env.update(PYTHONPATH=str(pod / ".mf_code"), METAFLOW_EXTRACTED_ROOT=str(pod),
                   METAFLOW_INIT_AGENT_WALLET=worker.agent_id)
    run_id = "pod-" + uuid.uuid4().hex[:10]
    top = [str(pod_python), "pod_paid_flow.py", "--quiet", "--no-pylint", "--metadata=service",
           "--environment=local", "--datastore=s3", f"--datastore-root={topo.sysroot}"]

    def task(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(top + list(args), cwd=pod, env=pod_env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    task("init", "--run-id", run_id, "--task-id", "1")
    for step, task_id, inputs in (("start", "2", f"{run_id}/_parameters/1"), ("work", "3", f"{run_id}/start/2"),
                                  ("end", "4", f"{run_id}/work/3")):
        task("step", step, "--run-id", run_id, "--task-id", task_id, "--input-paths", inputs,
             "--retry-count", "0", "--max-user-code-retries", "0")

    assert topo.wallet(payer) == {"usdc": Decimal("99.000000"), "locked": Decimal("0.000000")}
    assert topo.wallet(worker)["usdc"] == Decimal("0.990000")
    # The escrow records reached the metadata service from the "pod" as they happened. (Read
    # from the service's task metadata: metaflow-local-service 0.2.0 assigns run ids itself and
    # never registers a run under an id the orchestrator chose, so the Metaflow client, and
    # `pf-metaflow ledger`, cannot open such a run there; a Metaflow metadata service does.)
    import urllib.request

    with urllib.request.urlopen(f"{topo.service_url}/flows/PodPaidFlow/runs/{run_id}/steps/work/tasks/3/metadata") as r:
        records = [json.loads(m["value"]) for m in json.load(r) if m.get("type") == "pf-escrow"]
    assert records, "no escrow record reached the metadata service"
    latest = max(records, key=lambda r: r.get("seq", 0))  # the service lists them in no particular order
    assert latest["status"] == "released" and latest["recipient"] == worker.agent_id, records


def test_a_usdc_budget_given_to_a_deployment_trigger_is_json_text_and_exact_elsewhere():
    from metaflow._vendor import click

    from pf_metaflow.params import USDC

    param = SimpleNamespace(name="total_budget_usdc")
    for deployer in ("argo-workflows", "step-functions"):
        ctx = click.Context(click.Command("trigger"), info_name="trigger",
                            parent=click.Context(click.Group(deployer), info_name=deployer))
        value = USDC.convert("12", param, ctx)
        assert value == "12.000000" and json.dumps({"total_budget_usdc": value})
    run_ctx = click.Context(click.Command("run"), info_name="run")
    assert USDC.convert("12.5", param, run_ctx) == Decimal("12.5")
    assert isinstance(USDC.convert(12.1, param, None), Decimal)


# ---------------------------------------------------------------------------------------
# 5. Orchestrator-assigned ids: a paid flow compiled by metaflow-dagster and run by the real
#    `dagster job execute`, under local metadata, paying over the HTTP sandbox escrow


DAG_FLOW = '''
from metaflow import FlowSpec, step
from pf_metaflow import pf_escrow_step

PAY = dict(agent_wallet="AGENT", amount_usdc="1.00")


class DagPaidFlow(FlowSpec):
    @pf_escrow_step(**PAY)
    @step
    def start(self):
        self.next(self.prep)

    @pf_escrow_step(**PAY)
    @step
    def prep(self):
        self.next(self.left, self.right)

    @pf_escrow_step(**PAY)
    @step
    def left(self):
        self.next(self.join)

    @pf_escrow_step(**PAY)
    @step
    def right(self):
        self.next(self.join)

    @pf_escrow_step(**PAY)
    @step
    def join(self, inputs):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    DagPaidFlow()
'''


def _dagster_env(topo, tmp_path: Path, key: str) -> dict:
    """Local metadata and datastore (in ``tmp_path``), the escrow over HTTP with ``key``, and a
    Dagster instance of its own (``DAGSTER_HOME`` in ``tmp_path``, telemetry off)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return _env(topo, {"PF_ESCROW_URL": topo.escrow_url, "PF_API_KEY": key, "DAGSTER_HOME": str(home),
                       "METAFLOW_DEFAULT_METADATA": "local", "METAFLOW_DEFAULT_DATASTORE": "local",
                       "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})


def _dagster_create(tmp_path: Path, flow: Path, env: dict) -> Path:
    """``flow.py --metadata=local --datastore=local dagster create job.py`` (repaired, see below)."""
    import ast

    pytest.importorskip("metaflow_extensions.dagster", reason="needs metaflow-dagster (the distributed extra)")
    out = tmp_path / "dagster_job.py"
    proc = subprocess.run([sys.executable, str(flow), "--no-pylint", "--metadata=local", "--datastore=local",
                           "dagster", "create", str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    source = out.read_text()
    try:
        ast.parse(source)
    except SyntaxError:
        out.write_text(_repair_split_ops(source))
        ast.parse(out.read_text())
    return out


def _repair_split_ops(source: str) -> str:
    """metaflow-dagster 0.3.7 writes the op of a static split (``self.next(a, b)``) indented by
    8 spaces, with its second ``yield Output(...)`` at column 0, so the job file does not parse
    (IndentationError). The bug is ``DagsterCompiler._render_split_op`` in
    ``metaflow_extensions/dagster/plugins/dagster/dagster_compiler.py`` (lines 1092-1104): it
    joins the yields with a newline and 4 spaces and substitutes them into a ``dedent`` f-string
    template indented by 12, so the common indent ``dedent`` strips is 4, not 12. Put the block
    back at the top level, as the other ops are (only when the file does not parse as written)."""
    lines, out, i = source.split("\n"), [], 0
    while i < len(lines):
        if lines[i].startswith("        @op("):
            while i < len(lines) and lines[i].strip():
                line = lines[i]
                out.append(line[8:] if line.startswith("        ") else "    " + line)
                i += 1
            continue
        out.append(lines[i])
        i += 1
    return "\n".join(out)


_DAGSTER_RECORD = """
import json
from dagster import DagsterInstance


def chain(error):
    messages = []
    while error is not None:
        messages.append(error.message)
        error = error.cause or getattr(error, "context", None)
    return messages


with DagsterInstance.get() as instance:
    runs = []
    for run in instance.get_runs():
        events = []
        for entry in instance.all_logs(run.run_id):
            event = entry.dagster_event
            failure = event.step_failure_data.error if event is not None and event.is_step_failure else None
            events.append({"op": entry.step_key, "type": event.event_type_value if event else None,
                           "message": entry.user_message, "errors": chain(failure)})
        runs.append({"run_id": run.run_id, "job": run.job_name, "status": run.status.value, "events": events})
print(json.dumps(runs))
"""


def _dagster_execute(tmp_path: Path, job_file: Path, job: str, env: dict) -> SimpleNamespace:
    """``dagster job execute -f job.py -j JOB``: the real Dagster CLI (its default multiprocess
    executor, one process an op), which gives the run its id; the Metaflow run id is
    ``dagster-`` + 12 hex of it (metaflow-dagster's ``_make_run_id``). What Dagster did is read
    back from its instance (``DAGSTER_HOME``'s event log), not from the console: an op process
    that fails may exit before its last log lines reach stderr (seen with dagster 1.7)."""
    import hashlib
    import importlib.util

    if importlib.util.find_spec("dagster") is None:
        pytest.skip("needs dagster (the distributed extra)")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dagster", "job", "execute", "-f", str(job_file), "-j", job],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - started
    out = proc.stdout + "\n" + proc.stderr
    record = subprocess.run([sys.executable, "-c", _DAGSTER_RECORD], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert record.returncode == 0, record.stdout + record.stderr
    runs = json.loads(record.stdout.strip().splitlines()[-1])
    assert [r["job"] for r in runs] == [job], out[-5000:]
    (dagster_run,) = runs
    run_id = "dagster-" + hashlib.sha1(dagster_run["run_id"].encode()).hexdigest()[:12]
    local_runs = sorted(p.name for p in (tmp_path / ".metaflow" / job).iterdir() if p.name.startswith("dagster-"))
    assert local_runs == [run_id], (local_runs, run_id)  # the one run, under the id Dagster's run gave it
    commands = {}  # op -> the Metaflow command lines it ran ("$ python flow.py ... step S --run-id ...")
    for event in dagster_run["events"]:
        if event["type"] is None and (event["message"] or "").startswith("$ "):
            commands.setdefault(event["op"], []).append(event["message"])
    failures = {e["op"]: " / ".join(e["errors"]) for e in dagster_run["events"] if e["type"] == "STEP_FAILURE"}
    return SimpleNamespace(rc=proc.returncode, out=out, status=dagster_run["status"], run_id=run_id,
                           commands=commands, failures=failures, seconds=seconds)


def _local_pf(tmp_path: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    """``pf-metaflow ARGS`` reading runs from the local metadata in ``tmp_path``."""
    return subprocess.run([sys.executable, "-m", "pf_metaflow", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def _local_ledger(tmp_path: Path, env: dict, pathspec: str) -> dict:
    proc = _local_pf(tmp_path, env, "ledger", pathspec, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


@distributed
def test_a_paid_flow_run_by_dagster_pays_every_task_with_its_task_ids(topo, tmp_path, payer, worker):
    env = _dagster_env(topo, tmp_path, payer.api_key)
    flow = tmp_path / "dag_paid_flow.py"
    flow.write_text(DAG_FLOW.replace("AGENT", worker.agent_id))
    job_file = _dagster_create(tmp_path, flow, env)
    run = _dagster_execute(tmp_path, job_file, "DagPaidFlow", env)
    assert run.rc == 0 and run.status == "SUCCESS", run.out[-5000:]
    assert run.run_id.startswith("dagster-") and len(run.run_id) == len("dagster-") + 12
    # metaflow-dagster runs every task, start, linear, split, branches and join, as task 1.
    for step_name in ("start", "prep", "left", "right", "join", "end"):
        assert any(f" step {step_name} --run-id {run.run_id} --task-id 1 " in c
                   for c in run.commands[f"op_{step_name}"]), (step_name, run.commands)

    # What moved on the escrow service: 5 x 1.00 from the payer, 5 x 0.99 to the agent.
    assert topo.wallet(payer) == {"usdc": Decimal("95.000000"), "locked": Decimal("0.000000")}
    assert topo.wallet(worker)["usdc"] == Decimal("4.950000")
    topo.check_conservation()

    # The ledger (CLI, and read_run through the Metaflow client) has every paid task, task id 1.
    pathspec = f"DagPaidFlow/{run.run_id}"
    ledger = _local_ledger(tmp_path, env, pathspec)
    assert ledger["complete"] is True, ledger["unseen"]
    assert sorted((e["step"], e["task"], e["status"], e["recipient"]) for e in ledger["entries"]) == [
        (s, "1", "released", worker.agent_id) for s in ("join", "left", "prep", "right", "start")]
    assert ledger["totals"]["released"] == "5.000000" and ledger["totals"]["net_paid"] == "4.950000"
    code = ("import json, pf_metaflow\nfrom metaflow import Run, namespace\nnamespace(None)\n"
            f"reading = pf_metaflow.read_run(Run({pathspec!r}))\n"
            "print(json.dumps({'entries': reading.entries, 'complete': reading.complete, 'unseen': reading.unseen}))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    read = json.loads(proc.stdout.strip().splitlines()[-1])
    assert read["complete"] is True, read["unseen"]
    assert sorted(e["escrow_id"] for e in read["entries"]) == sorted(e["escrow_id"] for e in ledger["entries"])

    rec = _local_pf(tmp_path, env, "reconcile", pathspec)
    assert rec.returncode == 0 and "nothing to do" in rec.stdout + rec.stderr, rec.stdout + rec.stderr
    print(f"DagPaidFlow under dagster job execute: {run.seconds:.1f} s")


@distributed
def test_a_paid_task_killed_under_dagster_is_found_and_reconciled(topo, tmp_path, payer):
    env = _dagster_env(topo, tmp_path, payer.api_key)
    flow = tmp_path / "kill_flow.py"
    flow.write_text((TESTFLOWS / "kill_flow.py").read_text())  # `work` SIGKILLs itself once its escrow is locked
    job_file = _dagster_create(tmp_path, flow, env)
    run = _dagster_execute(tmp_path, job_file, "KillFlow", env)
    assert run.rc != 0 and run.status == "FAILURE", run.out[-5000:]
    assert list(run.failures) == ["op_work"] and "Command failed (exit -9)" in run.failures["op_work"], run.failures
    assert any(f" step work --run-id {run.run_id} --task-id 1 " in c for c in run.commands["op_work"])
    pathspec = f"KillFlow/{run.run_id}"
    assert topo.wallet(payer) == {"usdc": Decimal("97.500000"), "locked": Decimal("2.500000")}

    ledger = _local_ledger(tmp_path, env, pathspec)
    assert [(e["step"], e["task"], e["status"], e["amount_usdc"]) for e in ledger["entries"]] == [
        ("work", "1", "locked", "2.500000")]

    dry = _local_pf(tmp_path, env, "reconcile", pathspec, "--dry-run")
    assert dry.returncode == 1, dry.stdout + dry.stderr  # something to settle, nothing moved
    assert topo.wallet(payer)["locked"] == Decimal("2.500000")

    rec = _local_pf(tmp_path, env, "reconcile", pathspec)
    assert rec.returncode == 0, rec.stdout + rec.stderr
    assert "refunded" in rec.stdout
    assert topo.wallet(payer) == {"usdc": Decimal("100.000000"), "locked": Decimal("0.000000")}
    topo.check_conservation()

    again = _local_pf(tmp_path, env, "reconcile", pathspec)
    assert again.returncode == 0 and "nothing to do" in again.stdout + again.stderr, again.stdout + again.stderr
    assert topo.wallet(payer) == {"usdc": Decimal("100.000000"), "locked": Decimal("0.000000")}
    after = _local_ledger(tmp_path, env, pathspec)
    assert [e["status"] for e in after["entries"]] == ["refunded"]
    assert after["complete"] is True
    print(f"KillFlow under dagster job execute: {run.seconds:.1f} s")
