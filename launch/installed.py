"""Is this checkout already installed with these extras? (launch/install.sh asks before running pip.)

    python launch/installed.py [EXTRA,EXTRA...]

Exit 0 when gatepro_dist is installed editable from this checkout, at pyproject.toml's version, with
its console scripts, and every requirement of the dependencies and the named extras is met by an
installed distribution; exit 1 otherwise, naming the first thing missing on stderr. Reads package
metadata only (nothing is imported), so a run with nothing to install costs well under a second
instead of pip's ten or more; rerunning the quickstart pays only the training.
"""
from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parent.parent


def missing(extras: list[str], root: Path = ROOT) -> str | None:
    """The first reason pip must run, or None when everything asked for is installed."""
    try:
        import tomllib  # Python >= 3.11

        from packaging.requirements import Requirement  # comes with matplotlib, so after one install
    except ImportError as err:
        return f"cannot check without {err.name}"
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    unknown = sorted(set(extras) - set(project["optional-dependencies"]))
    if unknown:
        return f"no extra named {', '.join(unknown)} in pyproject.toml"
    wanted = project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]
    for text in wanted:
        requirement = Requirement(text)
        if requirement.marker and not requirement.marker.evaluate():
            continue
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            return f"{requirement.name} is not installed"
        if not requirement.specifier.contains(version, prereleases=True):
            return f"{requirement.name} {version} does not satisfy {text}"
    # What pip installed (with a direct_url.json), not a checkout's egg-info that sys.path reaches.
    installs = [d for d in metadata.distributions(name=project["name"]) if d.read_text("direct_url.json")]
    if not installs:
        return f"{project['name']} is not installed"
    ours = installs[0]
    if ours.version != project["version"]:
        return f"{project['name']} {ours.version} is installed, pyproject.toml says {project['version']}"
    url = json.loads(ours.read_text("direct_url.json"))
    if not url.get("dir_info", {}).get("editable") or Path(unquote(urlparse(url.get("url", "")).path)) != root:
        return f"{project['name']} is not installed editable from this checkout"
    scripts = {ep.name: ep.value for ep in ours.entry_points if ep.group == "console_scripts"}
    if scripts != project.get("scripts", {}):
        return "the console scripts differ from pyproject.toml's"
    return None


def main(argv: list[str]) -> int:
    extras = [e for arg in argv for e in arg.split(",") if e]
    reason = missing(extras)
    if reason:
        print(f"installed.py: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
