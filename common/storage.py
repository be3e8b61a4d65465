"""The team's object store (`make storage`): SeaweedFS's S3 API, on loopback unless told otherwise.

Every tool of the project reaches a bucket the same way, through the AWS SDKs' own environment variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`), plus `STORAGE_URL`, the bucket's URL: boto3
(MLflow's artifacts), s3fs (DVC's remote), pyarrow and DuckDB (the prediction log). The first start makes a
key pair and writes it twice, in files only their owner can read: SeaweedFS's identity file, and
`credentials.env`, those variables as `NAME=value` lines, which the Makefile includes, a shell sources
(`set -a; . credentials.env`), and `kubectl create secret generic --from-env-file` and `docker --env-file` read.
SeaweedFS's usage reports stay off (`-master.telemetry=false`).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from common.ports import free_ports
from common.private_files import ExposedSecretError, read_private, write_private

REPO = Path(__file__).resolve().parents[1]
BUCKET = "fashion-mnist"
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 -- compared with --host, never bound to here
S3_PORT = 8333
# SeaweedFS's other components in `weed mini`: internal, each on a free port chosen at start
COMPONENTS = ("master", "volume", "filer", "admin")


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str


def credential_files(folder: Path) -> dict[str, Path]:
    """The store's secrets: SeaweedFS's identity file, and the same key pair as environment variables."""
    return {"identities": folder / "s3.json", "env": folder / "credentials.env"}


def client_env(credentials: Credentials, endpoint: str, bucket: str) -> dict[str, str]:
    """The variables that point every S3 client of the project at the bucket."""
    return {
        "AWS_ACCESS_KEY_ID": credentials.access_key,
        "AWS_SECRET_ACCESS_KEY": credentials.secret_key,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": "us-east-1",  # SeaweedFS ignores it; SDKs sign requests with one
        "STORAGE_URL": f"s3://{bucket}",
    }


def read_env_file(path: Path) -> dict[str, str]:
    """A `NAME=value` file's variables (refused when others may read it)."""
    lines = read_private(path).splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def credentials(folder: Path) -> tuple[Credentials, bool]:
    """The store's key pair, made on first start; and whether it was made just now."""
    files = credential_files(folder)
    if files["identities"].exists():
        identity = json.loads(read_private(files["identities"]))["identities"][0]["credentials"][0]
        return Credentials(identity["accessKey"], identity["secretKey"]), False
    made = Credentials(secrets.token_hex(10).upper(), secrets.token_urlsafe(30))
    identities = {
        "identities": [
            {
                "name": "fashion-mnist-mlops",
                "credentials": [{"accessKey": made.access_key, "secretKey": made.secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    write_private(files["identities"], json.dumps(identities, indent=2))
    return made, True


def write_client_env(folder: Path, credentials: Credentials, endpoint: str, bucket: str) -> Path:
    """`credentials.env`, written anew at each start: the endpoint follows the address the store serves at."""
    path = credential_files(folder)["env"]
    path.unlink(missing_ok=True)
    variables = client_env(credentials, endpoint, bucket)
    lines = "\n".join(f"{name}={value}" for name, value in variables.items())
    write_private(path, f"# the team's object store (`make storage`): keep it secret\n{lines}")
    return path


def advertised_address(host: str) -> str:
    """The address other hosts reach the store at: `host`, or for 0.0.0.0 this machine's first IPv4 address."""
    if host != ALL_INTERFACES:
        return host
    return str(socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)[0][4][0])


def weed_command(folder: Path, host: str, s3_port: int, bucket: str) -> list[str]:
    """`weed mini` serving `bucket` over S3 at `host`:`s3_port` from `folder`/data, with the identity file's key
    pair required, usage reports off, no WebDAV, admin UI or table catalogs, and its internal components (HTTP
    and gRPC each) on free ports of `host`."""
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or "weed"
    ports = iter(free_ports(host, 2 * len(COMPONENTS) + 1))
    component_ports = [
        flag for name in COMPONENTS for flag in (f"-{name}.port={next(ports)}", f"-{name}.port.grpc={next(ports)}")
    ]
    return [
        weed, "mini",
        f"-dir={folder / 'data'}",
        f"-ip={advertised_address(host)}",
        f"-ip.bind={host}",
        f"-bucket={bucket}",
        f"-s3.config={credential_files(folder)['identities']}",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.port={s3_port}",
        f"-s3.port.grpc={next(ports)}",
        *component_ports,
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=REPO / ".storage", help="data and credentials")
    parser.add_argument("--host", default="127.0.0.1", help="an address of this machine; 0.0.0.0 for all")
    parser.add_argument("--port", type=int, default=S3_PORT, help="the S3 API's")
    parser.add_argument("--bucket", default=BUCKET)
    args = parser.parse_args()
    endpoint = f"http://{advertised_address(args.host)}:{args.port}"
    try:
        pair, made = credentials(args.dir)
    except ExposedSecretError as exc:
        sys.exit(f"storage: {exc}")
    env_file = write_client_env(args.dir, pair, endpoint, args.bucket)
    print(
        f"storage: s3://{args.bucket} at {endpoint}; credentials {'made now, ' if made else ''}in {env_file} "
        "(mode 600): the Makefile of this clone uses them, other clones and hosts take a copy (STORAGE_ENV=<file>)",
        flush=True,
    )
    command = weed_command(args.dir, args.host, args.port, args.bucket)
    os.execv(command[0], command)  # noqa: S606 -- this process becomes SeaweedFS


if __name__ == "__main__":
    main()
