"""The MLflow Model Registry as the service reads it: which version an alias names, and that version's files.

A registered version is the exported fp32 ONNX file (the mlflow.onnx model); its int8 twin and the monitoring
reference are artifacts of the same run, in a folder of their export's own (a run exported again, say after
distillation, keeps every earlier export's files). Each version's tags name its BentoML tag and every file's sha256
(the keys the BentoML store's metadata uses), so whoever downloads a file can tell it is the one exported.
MLflow is imported on first use: a built bento serves without it unless it follows the registry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from common.model_store import STORED_FILES

CHAMPION = "champion"  # the alias the service serves, as params.yaml's mlflow.alias names it by default
CHALLENGER = "challenger"  # a version tried on live traffic beside the champion (shadow), not yet served
PREVIOUS = "previous"  # the champion before the last promotion: what `make rollback` returns to
RUN_FILES = "onnx"  # where in its run each export's files are, one folder per export (the export stage logs them)


def run_files(bentoml_tag: str) -> str:
    """The folder of a run's artifacts that holds one export's files: named by the export's BentoML version."""
    return f"{RUN_FILES}/{bentoml_tag.split(':')[-1]}"


class RegistryError(RuntimeError):
    """A version's file could not be had from the registry."""


class ChecksumError(RegistryError):
    """A downloaded file is not the file its version was registered with."""


@dataclass(frozen=True)
class Version:
    """A registered version of the served model: its number, the run that made it and its tags."""

    version: int
    run_id: str
    tags: dict[str, str]

    @property
    def bentoml_tag(self) -> str:
        return self.tags["bentoml_tag"]

    def sha256(self, role: str) -> str | None:
        """The checksum a file (by role: fp32, int8, reference) was registered with, if the version records it."""
        return self.tags.get(STORED_FILES[role][1])


def version_of(found) -> Version:
    """A version as MLflow gives it, in the terms the project uses."""
    return Version(int(found.version), found.run_id or "", dict(found.tags))


def by_alias(name: str, alias: str) -> Version | None:
    """The version `alias` points at, or None (no such model, no such alias), from the active tracking URI."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return version_of(mlflow.MlflowClient().get_model_version_by_alias(name, alias))
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def download(name: str, version: Version, roles: tuple[str, ...], folder: Path) -> dict[str, Path]:
    """A version's files by role (fp32, int8, reference), as the BentoML store keeps them: the registered fp32
    file, the others from its run. A role the run lacks is left out; a file whose sha256 differs from the one
    its version records raises ChecksumError."""
    import mlflow
    from mlflow.exceptions import MlflowException

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for role in roles:
        file = STORED_FILES[role][0]
        try:
            if role == "fp32":
                uri = f"models:/{name}/{version.version}"
                files[role] = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(folder / role))) / file
            else:
                path = mlflow.artifacts.download_artifacts(
                    run_id=version.run_id,
                    artifact_path=f"{run_files(version.bentoml_tag)}/{file}",
                    dst_path=str(folder / role),
                )
                files[role] = Path(path)
        except (MlflowException, OSError) as exc:
            if role == "int8":
                continue  # exported without an int8 file: the fp32 one serves
            raise RegistryError(f"{name} version {version.version}: its {file} cannot be downloaded ({exc})") from None
    verify(name, version, files)
    return files


def verify(name: str, version: Version, files: dict[str, Path]) -> None:
    """Raise ChecksumError unless every file has the sha256 its version records."""
    from common.files import sha256_file

    for role, path in files.items():
        expected = version.sha256(role)
        if expected is not None and (actual := sha256_file(path)) != expected:
            raise ChecksumError(
                f"{name} version {version.version}: {path.name} has sha256 {actual[:12]}..., "
                f"not the {expected[:12]}... it was registered with"
            )


def without_login(uri: str) -> str:
    """A tracking URI fit for a log line: no user or password in it."""
    return re.sub(r"//[^/@]*@", "//", uri)
