"""Data, models and MLflow artifacts on an S3-compatible store: a real round trip against moto's
S3 server on 127.0.0.1.

One clone runs the tiny pipeline (tracking on an `mlflow server` whose artifacts go to the same
bucket), pushes to a DVC remote on S3 with the run cache; a fresh `git clone` pulls and must not
retrain: `dvc repro --allow-missing` finds every stage unchanged and leaves the model byte for byte.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import start_process_group, stop_process_group
from tests.helpers import free_port, git, tiny_repo, wait_healthy

pytestmark = pytest.mark.slow

BUCKET = "lmforge"
TARGET = "gate"  # package builds a Bento, which the storage round trip does not need
# Dummy credentials for moto. The shared AWS config files are set per test to empty ones, so no
# real profile on this machine is read (botocore refuses /dev/null).
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def start_server(cmd: list[str], health_url: str, log: Path, env: dict) -> subprocess.Popen:
    """Start ``cmd`` in its own session (its workers stop with it); wait until ``health_url`` answers."""
    with log.open("w") as out:
        proc = start_process_group(cmd, cwd=log.parent, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        wait_healthy(health_url, proc, log, what=cmd[0])
    except BaseException:  # pytest.fail: not answering, or exited
        if proc.poll() is None:
            stop_process_group(proc)
        raise
    return proc


@pytest.fixture(scope="module", autouse=True)
def aws_env(tmp_path_factory):
    """AWS_ENV, with empty shared config files, in this process's environment for the module."""
    root = tmp_path_factory.mktemp("aws")
    files = {"AWS_CONFIG_FILE": root / "config", "AWS_SHARED_CREDENTIALS_FILE": root / "credentials"}
    for path in files.values():
        path.touch()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {**AWS_ENV, **files}.items():
            mp.setenv(name, str(value))
        yield


def server_env() -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with one empty bucket: (endpoint URL, boto3 client)."""
    import boto3

    root = tmp_path_factory.mktemp("moto")
    endpoint = f"http://127.0.0.1:{free_port()}"
    port = endpoint.rsplit(":", 1)[1]
    moto = str(Path(sys.executable).parent / "moto_server")
    proc = start_server([moto, "-H", "127.0.0.1", "-p", port], f"{endpoint}/moto-api/",
                        root / "moto.log", server_env())
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=BUCKET)
        yield endpoint, client
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="module")
def mlflow_on_s3(s3, tmp_path_factory):
    """An `mlflow server` (sqlite backend) proxying artifacts to s3://BUCKET/mlflow: its URL.

    Only the server holds S3 settings; clients need MLFLOW_TRACKING_URI alone.
    """
    endpoint, _ = s3
    root = tmp_path_factory.mktemp("mlflow-server")
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server",
           "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
           "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--serve-artifacts",
           "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "1"]
    env = {**server_env(), "MLFLOW_S3_ENDPOINT_URL": endpoint,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # job runner: 8 processes no stage uses
    proc = start_server(cmd, f"{url}/health", root / "server.log", env)
    try:
        yield url
    finally:
        stop_process_group(proc)


def run_dvc(repo: Path, *args: str, aws: bool = True, **env_vars: str) -> str:
    """`dvc ARGS` in ``repo``, its stdout; ``aws=False``: without any AWS_* variable."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {k: v for k, v in os.environ.items() if aws or not k.startswith("AWS_")}
    env.update(PATH=path, **env_vars)
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def bucket_keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_push_from_one_clone_pull_into_a_fresh_one_without_retraining(
        s3, mlflow_on_s3, tmp_path, tiny_model_dir):
    endpoint, client = s3
    repo = tiny_repo(tmp_path / "repo", tiny_model_dir)
    started = time.monotonic()
    # The pipeline gets the tracking server's URL and nothing about S3: the server stores artifacts.
    out = run_dvc(repo, "repro", TARGET, aws=False, MLFLOW_TRACKING_URI=mlflow_on_s3)
    assert "Running stage 'train'" in out
    print(f"\nrepro {TARGET}: {time.monotonic() - started:.1f} s")

    # The remote lives in the committed .dvc/config: a clone finds it. Credentials stay in the
    # environment (or `dvc remote modify --local`), never in git.
    run_dvc(repo, "remote", "add", "-d", "s3", f"s3://{BUCKET}/dvc")
    run_dvc(repo, "remote", "modify", "s3", "endpointurl", endpoint)
    run_dvc(repo, "remote", "modify", "s3", "region", "us-east-1")
    started = time.monotonic()
    pushed = run_dvc(repo, "push", "--run-cache")
    print(f"push: {time.monotonic() - started:.1f} s: {pushed.strip().splitlines()[-1]}")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "pipeline run, S3 remote")

    # What landed: content-addressed files (data, processed data, model, reports) and run-cache
    # entries for the stages DVC can cache runs of (none with a persisted output).
    files, runs = bucket_keys(client, "dvc/files/md5/"), bucket_keys(client, "dvc/runs/")
    artifacts = bucket_keys(client, "mlflow/")
    print(f"bucket: {len(files)} DVC objects, {len(runs)} run-cache entries, "
          f"{len(artifacts)} MLflow artifacts")
    entries = [yaml.safe_load(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
               for key in runs]
    cached_stages = {entry["cmd"].removeprefix("python -m stages.") for entry in entries}
    # DVC run-caches no stage with a persisted output: every stage that writes aside and keeps
    # its last good outputs on failure (check, ingest, prepare, train, evaluate, export, gate,
    # package; docs/pipeline.md) trades its run cache for that. validate is the one left.
    # dvc.lock and the pushed files bring the outputs back all the same.
    assert "validate" in cached_stages, cached_stages
    assert not cached_stages & {"check", "ingest", "prepare", "train", "evaluate", "gate"}, cached_stages
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    model_md5 = next(o["md5"] for o in lock["train"]["outs"] if o["path"] == "models/model")
    assert f"dvc/files/md5/{model_md5[:2]}/{model_md5[2:]}" in files  # the model's .dir listing
    assert any(key.endswith("/model.safetensors") for key in artifacts)  # logged via the server

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    started = time.monotonic()
    # The outputs of the stages run here: dvc.lock also lists the copied repo's other stages.
    pulled = run_dvc(clone, "pull", "--run-cache", "--with-deps", TARGET)
    print(f"pull: {time.monotonic() - started:.1f} s: {pulled.strip().splitlines()[-1]}")
    assert files_of(clone / "models/model") == files_of(repo / "models/model")
    assert files_of(clone / "data/interim") == files_of(repo / "data/interim")

    # Every output is back (checkpoints are train's own scratch, not a DVC output): nothing to do.
    assert run_dvc(clone, "status", TARGET).strip() == "Data and pipelines are up to date."
    before = files_of(clone / "models/model")
    started = time.monotonic()
    out = run_dvc(clone, "repro", TARGET)
    print(f"repro in the clone: {time.monotonic() - started:.1f} s")
    assert "Running stage" not in out, out
    for stage in ("ingest", "validate", "prepare", "train", "evaluate", "gate"):
        assert f"Stage '{stage}' didn't change" in out, out
    assert files_of(clone / "models/model") == before
    assert git(clone, "status", "--porcelain") == ""  # dvc.lock and metrics untouched
