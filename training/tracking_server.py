"""An MLflow tracking server for a team (`make mlflow-server`): runs and the model registry in PostgreSQL,
artifacts stored and proxied by the server, in the team's bucket where one is set (common/storage.py; clients
need no storage credentials), and MLflow's own authentication (`--app-name basic-auth`): every request needs a
user's password, and a new user may see nothing until granted a permission. Clients set
`MLFLOW_TRACKING_URI=http://<host>:<port>` and `MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`
(docs/pipeline.md).

PostgreSQL: $MLFLOW_BACKEND_STORE_URI (and $MLFLOW_AUTH_DATABASE_URI for the users and permissions) where the
team has a database already; otherwise a cluster of this project's own on loopback, created on first use with
Debian's PostgreSQL (installed with apt-get where it is missing and this user may) with a generated password
(scram-sha-256), and started if it is not running. Every generated secret is a file only its owner can read,
in the server's home (`secret_files`); none is ever printed, logged or put in a URI.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from common.private_files import ExposedSecretError, read_private, secret, write_private
from training.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]
DATABASE = "mlflow"
AUTH_DATABASE = "mlflow_auth"  # MLflow's users and permissions, beside the tracking database
ADMIN = "admin"
PG_PORT = 5433  # beside, not on, a system PostgreSQL's 5432
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 -- compared with --host, never bound to here


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
    """A PostgreSQL cluster in `data_dir`, listening on 127.0.0.1:`port` only (no Unix socket), its role
    `mlflow` authenticated by scram-sha-256 with the password in `password_file` (libpq's pgpass format, which
    clients find through $PGPASSFILE, so the password is in no URI), with databases for MLflow's runs and its
    users. PostgreSQL refuses to run as root: as root, the cluster is the postgres user's."""

    def __init__(self, data_dir: Path, password_file: Path, port: int = PG_PORT):
        self.data_dir = data_dir
        self.password_file = password_file
        self.port = port
        self.bin = postgres_bin()
        self.as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def uri(self, database: str = DATABASE) -> str:
        return f"postgresql://{DATABASE}@127.0.0.1:{self.port}/{database}"

    @property
    def env(self) -> dict[str, str]:
        """What a client of the cluster needs in its environment: where its password is."""
        return {"PGPASSFILE": str(self.password_file)}

    def _run(self, program: str, *args: str, owner: bool = True, stdin: str | None = None):
        prefix = self.as_owner if owner else []
        env = {**os.environ, **self.env}
        return subprocess.run(
            [*prefix, str(self.bin / program), *args], capture_output=True, text=True, cwd="/", env=env, input=stdin
        )

    def _check(self, program: str, *args: str, owner: bool = True, stdin: str | None = None) -> str:
        done = self._run(program, *args, owner=owner, stdin=stdin)
        if done.returncode != 0:
            raise PipelineError(f"PostgreSQL {program} failed: {(done.stderr or done.stdout).strip()}")
        return done.stdout

    def _password(self) -> str:
        """The role's password, from the pgpass file (made on first use; any port, any database)."""
        if not self.password_file.exists():
            write_private(self.password_file, f"127.0.0.1:*:*:{DATABASE}:{secrets.token_urlsafe(24)}")
        return read_private(self.password_file).rsplit(":", 1)[1]

    def _initdb(self, password: str) -> None:
        """A new cluster whose every connection needs the role's password, from the first start on."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="initdb-")  # mode 0600; read by initdb (the cluster's owner), deleted
        pwfile = Path(name)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        if self.as_owner:
            shutil.chown(self.data_dir, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        try:
            self._check(
                "initdb", "-D", str(self.data_dir), "-U", DATABASE, "--auth=scram-sha-256", f"--pwfile={pwfile}",
                "-E", "UTF8",
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)

    def _require_passwords(self, password: str) -> None:
        """A cluster made before it had a password (trust authentication): the role gets one, then every
        connection needs it."""
        hba = self.data_dir / "pg_hba.conf"
        rules = [line.split() for line in hba.read_text().splitlines() if line.strip()[:1] not in ("#", "")]
        if not any("trust" in rule for rule in rules):
            return
        sql = f"SET password_encryption = 'scram-sha-256'; ALTER ROLE {DATABASE} PASSWORD '{password}';"
        args = ("-h", "127.0.0.1", "-p", str(self.port), "-U", DATABASE, "-d", "postgres", "-qf", "-")
        if self._run("psql", *args, owner=False, stdin=sql).returncode != 0:  # its message would quote the password
            raise PipelineError(f"PostgreSQL psql could not set a password for role {DATABASE}")
        hba.write_text("".join(f"host all all {net} scram-sha-256\n" for net in ("127.0.0.1/32", "::1/128")))
        self._check("pg_ctl", "reload", "-D", str(self.data_dir))

    def start(self) -> str:
        """Create the cluster on first use, start it unless it runs, require passwords, create the
        databases; the tracking database's URI (no password in it: clients read $PGPASSFILE)."""
        password = self._password()
        if not (self.data_dir / "PG_VERSION").is_file():
            self._initdb(password)
        if self._run("pg_ctl", "status", "-D", str(self.data_dir)).returncode != 0:
            options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
            log = str(self.data_dir / "server.log")
            self._check("pg_ctl", "start", "-w", "-D", str(self.data_dir), "-o", options, "-l", log)
        self._require_passwords(password)
        for database in (DATABASE, AUTH_DATABASE):
            found = self._check(
                "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", DATABASE, "-d", "postgres", "-tA",
                "-v", f"name={database}", "-f", "-", owner=False,
                stdin="SELECT 1 FROM pg_database WHERE datname = :'name'",  # psql quotes the variable
            )  # fmt: skip
            if not found.strip():
                self._check("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", DATABASE, database, owner=False)
        return self.uri()

    def stop(self) -> None:
        self._run("pg_ctl", "stop", "-m", "fast", "-D", str(self.data_dir))


def default_home() -> Path:
    """The server's settings and secrets, one place per machine (every clone's server shares the cluster)."""
    if os.geteuid() == 0:
        return Path("/var/lib/fashion-mnist-mlops")
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "fashion-mnist-mlops"


def default_data_dir() -> Path:
    """Where this project's cluster lives: the postgres user's home as root, the server's home else."""
    if os.geteuid() == 0:
        return Path("/var/lib/postgresql/fashion-mnist-mlops")
    return default_home() / "postgres"


def secret_files(home: Path) -> dict[str, Path]:
    """The server's secrets: the database role's password (pgpass format), the first admin's password, and
    the key of its CSRF tokens."""
    return {
        "postgres": home / "postgres.pgpass",
        "admin": home / "mlflow-admin-password",
        "flask": home / "mlflow-flask-secret-key",
    }


def allowed_hosts(host: str, port: int | str) -> list[str]:
    """The Host headers the server answers: the address it serves at, and for 0.0.0.0 this machine's names
    and addresses; each with and without the port. A page on any other name (DNS rebinding) is refused."""
    names = {"127.0.0.1", "localhost"} if host in ("127.0.0.1", "localhost", ALL_INTERFACES) else {host}
    if host == ALL_INTERFACES:
        hostname = socket.gethostname()
        names |= {hostname, socket.getfqdn()}
        with contextlib.suppress(OSError):  # a hostname that does not resolve has no addresses to add
            names |= {str(info[4][0]) for info in socket.getaddrinfo(hostname, None, socket.AF_INET)}
    return sorted({f"{name}:{port}" for name in names} | names)


def auth_config(home: Path, database_uri: str) -> Path:
    """MLflow's auth settings: users in `database_uri`, `admin` the first user, no permission by default."""
    path = home / "basic_auth.ini"
    path.write_text(
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = {database_uri}\n"
        f"admin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return path


def server_env(home: Path, auth_database_uri: str) -> tuple[dict[str, str], bool]:
    """The environment `mlflow server` needs for its authentication (config, first admin password, CSRF key),
    and whether the admin's password was made just now."""
    home.mkdir(parents=True, exist_ok=True)
    files = secret_files(home)
    admin_password, made = secret(files["admin"])
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(auth_config(home, auth_database_uri)),
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,  # read once, when the user store is empty
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secret(files["flask"])[0],
    }
    return env, made


def artifacts_destination(folder: Path | None, storage_url: str | None) -> str:
    """Where the server stores artifacts: `folder` where given, else the team's bucket where storage is set
    (`storage_url`, reached through AWS_ENDPOINT_URL and its keys), else mlflow-server/artifacts in this clone."""
    if folder is None and storage_url:
        return f"{storage_url.rstrip('/')}/mlflow-artifacts"
    return str(folder or REPO / "mlflow-server" / "artifacts")


def server_command(backend_uri: str, artifacts: str, host: str, port: int | str) -> list[str]:
    """`mlflow server` with authentication on PostgreSQL, storing and proxying the artifacts in `artifacts` (a
    folder or an s3:// URL), answering only the Host headers and browser origins of the address it serves at."""
    mlflow = Path(sys.executable).parent / "mlflow"
    hosts = allowed_hosts(host, port)
    origins = [f"http://{name}" for name in hosts if ":" in name]
    return [
        str(mlflow), "server",
        "--app-name", "basic-auth",
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", artifacts,
        "--serve-artifacts",
        "--host", host,
        "--port", str(port),
        "--allowed-hosts", ",".join(hosts),
        "--cors-allowed-origins", ",".join(origins),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve the team's other machines")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--artifacts", type=Path, help="a folder (default: the bucket, or mlflow-server/artifacts)")
    parser.add_argument("--home", type=Path, default=default_home(), help="the server's settings and secrets")
    args = parser.parse_args()
    try:
        if os.environ.get("MLFLOW_BACKEND_STORE_URI"):
            backend = os.environ["MLFLOW_BACKEND_STORE_URI"]
            auth_database = os.environ.get("MLFLOW_AUTH_DATABASE_URI") or f"sqlite:///{args.home / 'basic_auth.db'}"
        else:
            database = LocalPostgres(default_data_dir(), secret_files(args.home)["postgres"])
            backend, auth_database = database.start(), database.uri(AUTH_DATABASE)
            os.environ.update(database.env)
        env, made = server_env(args.home, auth_database)
    except (PipelineError, ExposedSecretError) as exc:
        sys.exit(f"mlflow-server: {exc}")
    if made:
        print(f"MLflow's first user is {ADMIN!r}; its password is in {secret_files(args.home)['admin']} (mode 600)")
    print(
        f"MLflow on {backend.split('@')[-1]}; clients: MLFLOW_TRACKING_URI=http://{args.host}:{args.port} with "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    )
    artifacts = artifacts_destination(args.artifacts, os.environ.get("STORAGE_URL"))
    print(f"artifacts in {artifacts}")
    command = server_command(backend, artifacts, args.host, args.port)
    os.execve(command[0], command, {**os.environ, **env})  # noqa: S606 -- this process becomes `mlflow server`


if __name__ == "__main__":
    main()
