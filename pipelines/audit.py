"""`make audit`: every package uv.lock pins (all extras and groups, exported by uv), checked for known
vulnerabilities with pip-audit against PyPI's advisory data; a table, a JSON report, and a failing exit for a
vulnerability that pipelines/audit-allowlist.yaml does not list with its reason, or for a package nothing
could check. Where PyPI answers no per-release data (a registry proxy may serve only a project's latest
release), a package pinned at PyPI's latest release is checked against the advisories PyPI lists for it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ALLOWLIST = Path(__file__).with_name("audit-allowlist.yaml")
PYPI_JSON = "https://pypi.org/pypi/{name}/json"


@dataclass
class Audited:
    name: str
    version: str
    advisories: list[dict] = field(default_factory=list)  # {id, aliases, fix_versions}
    source: str = "pip-audit"  # or "pypi latest", or "" when nothing could check it
    why_not: str = ""


def pins(requirements: Path) -> dict[str, str]:
    """name -> version of an exported lock (a local version label such as +cpu dropped: same release)."""
    found = {}
    for line in requirements.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;+]+)", line)
        if match:
            found[match[1].lower()] = match[2]
    return found


def pip_audit(packages: dict[str, str], folder: Path, extra_args: list[str]) -> list[Audited]:
    requirements = folder / "audit-requirements.txt"
    requirements.write_text("".join(f"{name}=={version}\n" for name, version in sorted(packages.items())))
    report = folder / "pip-audit.json"
    command = [
        str(Path(sys.executable).parent / "pip-audit"), "-r", str(requirements), "--no-deps", "--disable-pip",
        "--format", "json", "--progress-spinner", "off", "--output", str(report), *extra_args,
    ]  # fmt: skip
    subprocess.run(command, capture_output=True, text=True, check=False)  # exits 1 on a finding: read the report
    if not report.is_file():
        raise SystemExit(f"audit: pip-audit wrote no report ({shlex.join(command)})")
    results = []
    for dependency in json.loads(report.read_text())["dependencies"]:
        audited = Audited(dependency["name"].lower(), dependency.get("version", packages.get(dependency["name"], "")))
        if "skip_reason" in dependency:
            audited.source, audited.why_not = "", dependency["skip_reason"]
        else:
            audited.advisories = [
                {"id": v["id"], "aliases": v.get("aliases", []), "fix_versions": v.get("fix_versions", [])}
                for v in dependency.get("vulns", [])
            ]
        results.append(audited)
    return results


def from_latest_release(audited: Audited) -> Audited:
    """A package pip-audit could not look up, checked with PyPI's project page: its advisories are those of
    the latest release, so they answer for the pinned one only when it is that release."""
    try:
        with urllib.request.urlopen(PYPI_JSON.format(name=audited.name), timeout=60) as response:  # noqa: S310 -- a fixed https URL
            project = json.load(response)
    except OSError as exc:
        audited.why_not = f"PyPI's project page: {exc}"
        return audited
    latest = project["info"]["version"]
    if latest != audited.version:
        audited.why_not = f"PyPI gave no data for {audited.version}, and its advisories cover only {latest}"
        return audited
    audited.source, audited.why_not = "pypi latest", ""
    audited.advisories = [
        {"id": v["id"], "aliases": v.get("aliases", []), "fix_versions": v.get("fixed_in", [])}
        for v in project.get("vulnerabilities", [])
        if not v.get("withdrawn")
    ]
    return audited


def allowed(allowlist: list[dict], name: str, advisory: dict) -> str | None:
    """The allow-list's reason for this advisory of this package (by its id or an alias), if it lists one."""
    ids = {advisory["id"], *advisory["aliases"]}
    return next((e["reason"] for e in allowlist if e["package"] == name and e["id"] in ids), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("requirements", type=Path, help="the lock, exported (`uv export`)")
    parser.add_argument("--report", type=Path, default=Path("build/audit.json"))
    args = parser.parse_args()
    packages = pins(args.requirements)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    results = pip_audit(packages, args.report.parent, shlex.split(os.environ.get("AUDIT_ARGS", "")))
    unchecked = [r for r in results if not r.source]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(from_latest_release, unchecked))
    allowlist = yaml.safe_load(ALLOWLIST.read_text()) or []
    rows, failures = [], 0
    for result in sorted(results, key=lambda r: r.name):
        for advisory in result.advisories:
            reason = allowed(allowlist, result.name, advisory)
            failures += reason is None
            fixed = ", ".join(advisory["fix_versions"]) or "none yet"
            status = f"allowed: {reason}" if reason else "FAIL: not in the allow-list"
            rows.append(f"| {result.name} | {result.version} | {advisory['id']} | {fixed} | {status} |")
    unaudited = [r for r in results if not r.source]
    print("| package | version | advisory | fixed in | status |\n|---|---|---|---|---|")
    print("\n".join(rows) or "| (none) | | | | |")
    by_source = {s: sum(r.source == s for r in results) for s in ("pip-audit", "pypi latest")}
    found = sum(len(r.advisories) for r in results)
    print(
        f"\n{len(results)} packages: {by_source['pip-audit']} checked by pip-audit, {by_source['pypi latest']} against "
        f"PyPI's advisories for their latest release, {len(unaudited)} not checked; {found} known vulnerabilities, "
        f"{found - failures} allowed ({ALLOWLIST.name}), {failures} not"
    )
    for result in unaudited:
        print(f"not checked: {result.name} {result.version}: {result.why_not}")
    args.report.write_text(json.dumps([r.__dict__ for r in results], indent=2))
    if failures or unaudited:
        sys.exit(1)


if __name__ == "__main__":
    main()
