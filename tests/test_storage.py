"""The team's object store: `make storage` serves a bucket over S3 on loopback with credentials it made, the
DVC remote `storage` carries a run between two clones through it (`make push`, `make pull`), and MLflow's team
server keeps its artifacts there (tests/test_tracking_server.py)."""

import os

import boto3
import botocore.config
import botocore.exceptions
import psutil
import pytest

from benchmarks.local_server import free_port
from common.ports import ephemeral_ports
from common.storage import BUCKET, credential_files, read_env_file
from tests.conftest import REPO
from tests.pipeline_fixtures import VENV_BIN, clone_of_a_run, make, make_target, run, with_environment
from tests.storage_fixtures import s3_client, wait_for_bucket
from training.tracking_server import artifacts_destination

pytestmark = pytest.mark.slow


def weed_process(folder):
    return next(p for p in psutil.process_iter(["cmdline"]) if f"-dir={folder / 'data'}" in (p.info["cmdline"] or []))


def test_make_storage_serves_a_bucket_on_loopback_only_with_credentials_it_made(tmp_path):
    folder, port = tmp_path / "storage", free_port()
    target = ["storage", f"STORAGE_DIR={folder}", f"STORAGE_PORT={port}"]
    with make_target(target, dict(os.environ), f"http://127.0.0.1:{port}/healthz", tmp_path / "first.log"):
        files = credential_files(folder)
        assert {oct(path.stat().st_mode & 0o777) for path in files.values()} == {"0o600"}
        env = read_env_file(files["env"])
        assert env["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{port}"
        assert env["STORAGE_URL"] == f"s3://{BUCKET}"
        wait_for_bucket(env)
        weed = weed_process(folder)
        assert "-master.telemetry=false" in weed.cmdline()
        listening = [c.laddr for c in weed.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
        assert {address.ip for address in listening} == {"127.0.0.1"}
        # outside the range outgoing connections take ports from, so that a restart finds its ports free
        assert not {address.port for address in listening} & set(ephemeral_ports())

        s3_client(env).put_object(Bucket=BUCKET, Key="kept.txt", Body=b"kept")
        wrong = s3_client({**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"})
        unsigned = botocore.config.Config(signature_version=botocore.UNSIGNED)
        anonymous = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], config=unsigned)
        for client in (wrong, anonymous):
            with pytest.raises(botocore.exceptions.ClientError, match=r"AccessDenied|SignatureDoesNotMatch"):
                client.get_object(Bucket=BUCKET, Key="kept.txt")
        identities = files["identities"].read_text()

    with make_target(target, dict(os.environ), f"http://127.0.0.1:{port}/healthz", tmp_path / "second.log"):
        wait_for_bucket(env)
        assert files["identities"].read_text() == identities  # made once, on the first start
        assert s3_client(env).get_object(Bucket=BUCKET, Key="kept.txt")["Body"].read() == b"kept"
    assert "credentials made now" in (tmp_path / "first.log").read_text()
    assert "credentials made now" not in (tmp_path / "second.log").read_text()


def test_make_push_and_make_pull_carry_a_run_between_two_clones_through_the_bucket(pipeline, storage, tmp_path):
    repo, env, _ = pipeline
    with_storage = {**env, "STORAGE_ENV": str(storage.env_file)}
    run([str(VENV_BIN / "dvc"), "commit", "--force"], repo, env)  # the lock as the team commits it
    pushed = make(["push"], with_environment(repo), with_storage)
    cached = {p.relative_to(repo / ".dvc/cache").as_posix() for p in (repo / ".dvc/cache").rglob("*") if p.is_file()}
    in_bucket = {key.removeprefix("dvc/") for key in storage.keys("dvc/")}
    assert in_bucket <= cached
    assert f"{len(in_bucket)} files pushed" in pushed, pushed

    clone = with_environment(clone_of_a_run(repo, tmp_path / "clone"))
    make(["pull"], clone, with_storage)
    assert "up to date" in run([str(VENV_BIN / "dvc"), "status"], clone, env)
    for output in ("export/model.int8.onnx", "export/model.onnx", "data/prepared/dataset.npz"):
        assert (clone / output).read_bytes() == (repo / output).read_bytes(), output


def test_the_team_servers_artifacts_go_to_the_bucket_where_storage_is_set_and_to_a_folder_otherwise():
    assert artifacts_destination(None, "s3://team-bucket") == "s3://team-bucket/mlflow-artifacts"
    assert artifacts_destination(None, None) == str(REPO / "mlflow-server" / "artifacts")
    assert artifacts_destination(REPO / "elsewhere", "s3://team-bucket") == str(REPO / "elsewhere")
