"""An MLflow tracking server for a team (`make mlflow-server`): runs and the model registry in PostgreSQL,
artifacts stored and proxied by the server (clients need no storage credentials). Every clone points at it
with `MLFLOW_TRACKING_URI=http://<host>:<port>` (docs/pipeline.md).

PostgreSQL: $MLFLOW_BACKEND_STORE_URI where the team has a database already; otherwise a cluster of this
project's own on loopback, created on first use with Debian's PostgreSQL (installed with apt-get where it is
missing and this user may), and started if it is not running.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from training.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]
DATABASE = "mlflow"
PG_PORT = 5433  # beside, not on, a system PostgreSQL's 5432


def _as_root() -> list[str] | None:
    """The prefix that runs a command as root here, or None where this user cannot."""
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n"]
    return None


def postgres_bin() -> Path:
    """The folder of PostgreSQL's server programs, installing Debian's `postgresql` package where missing."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if found:
        return found[-1].parent
    root = _as_root()
    if root is None or not shutil.which("apt-get"):
        raise PipelineError(
            "PostgreSQL is not installed and this user cannot install it: `apt-get install postgresql` as root, "
            "or set MLFLOW_BACKEND_STORE_URI to the team's database"
        )
    print("installing Debian's postgresql for the MLflow tracking server", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "postgresql"]):
        subprocess.run([*root, *command], check=True, env=env, stdout=subprocess.DEVNULL)
    return postgres_bin()


class LocalPostgres:
    """A PostgreSQL cluster in `data_dir`, listening on 127.0.0.1:`port` only (no Unix socket), with a
    database for MLflow. PostgreSQL refuses to run as root: as root, the cluster is the postgres user's."""

    def __init__(self, data_dir: Path, port: int = PG_PORT):
        self.data_dir = data_dir
        self.port = port
        self.bin = postgres_bin()
        self.as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def uri(self) -> str:
        return f"postgresql://{DATABASE}@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, program: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*self.as_owner, str(self.bin / program), *args], capture_output=True, text=True, cwd="/")

    def _check(self, program: str, *args: str) -> str:
        done = self._run(program, *args)
        if done.returncode != 0:
            raise PipelineError(f"PostgreSQL {program} failed: {(done.stderr or done.stdout).strip()}")
        return done.stdout

    def start(self) -> str:
        """Create the cluster on first use, start it unless it runs, create the database; its URI."""
        if not (self.data_dir / "PG_VERSION").is_file():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if self.as_owner:
                shutil.chown(self.data_dir, "postgres", "postgres")
            self._check("initdb", "-D", str(self.data_dir), "-U", DATABASE, "--auth=trust", "-E", "UTF8")
        if self._run("pg_ctl", "status", "-D", str(self.data_dir)).returncode != 0:
            options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
            log = str(self.data_dir / "server.log")
            self._check("pg_ctl", "start", "-w", "-D", str(self.data_dir), "-o", options, "-l", log)
        found = self._check(
            "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", DATABASE, "-d", "postgres", "-tAc",
            f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'",
        )  # fmt: skip
        if not found.strip():
            self._check("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", DATABASE, DATABASE)
        return self.uri

    def stop(self) -> None:
        self._run("pg_ctl", "stop", "-m", "fast", "-D", str(self.data_dir))


def default_data_dir() -> Path:
    """Where this project's cluster lives: the postgres user's home as root, the user's data folder else."""
    if os.geteuid() == 0:
        return Path("/var/lib/postgresql/fashion-mnist-mlops")
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "fashion-mnist-mlops" / "postgres"


def server_command(backend_uri: str, artifacts: Path, host: str, port: int | str) -> list[str]:
    """`mlflow server` on PostgreSQL, storing and proxying the artifacts in `artifacts`."""
    mlflow = Path(sys.executable).parent / "mlflow"
    return [
        str(mlflow), "server",
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", str(artifacts),
        "--serve-artifacts",
        "--host", host,
        "--port", str(port),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve the team's other machines")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--artifacts", type=Path, default=REPO / "mlflow-server" / "artifacts")
    args = parser.parse_args()
    try:
        backend = os.environ.get("MLFLOW_BACKEND_STORE_URI") or LocalPostgres(default_data_dir()).start()
    except PipelineError as exc:
        sys.exit(f"mlflow-server: {exc}")
    print(f"MLflow on {backend.split('@')[-1]}; clients: MLFLOW_TRACKING_URI=http://{args.host}:{args.port}")
    command = server_command(backend, args.artifacts, args.host, args.port)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
