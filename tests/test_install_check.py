"""launch/installed.py: install.sh skips pip only when this checkout and every requirement asked
for are installed (read from package metadata). The whole install path runs in test_readme's fresh venv."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("installed", ROOT / "launch" / "installed.py")
installed = importlib.util.module_from_spec(spec)
spec.loader.exec_module(installed)


def test_this_checkout_with_the_test_extra_needs_no_pip():
    assert installed.missing(["test"]) is None  # tests/run.sh installed it editable from here
    done = subprocess.run([sys.executable, "launch/installed.py", "test"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == ""


def test_each_reason_to_run_pip_is_named(tmp_path):
    pyproject = (ROOT / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(pyproject)
    assert installed.missing(["test"], tmp_path) == "gatepro_dist is not installed editable from this checkout"
    assert installed.missing(["nosuch"]) == "no extra named nosuch in pyproject.toml"
    (tmp_path / "pyproject.toml").write_text(pyproject.replace('"pyyaml>=6"', '"pyyaml>=999"'))
    assert installed.missing([], tmp_path).startswith("pyyaml ") and installed.missing([], tmp_path).endswith(
        "does not satisfy pyyaml>=999")
    (tmp_path / "pyproject.toml").write_text(pyproject.replace('"pyyaml>=6"', '"no-such-distribution-here"'))
    assert installed.missing([], tmp_path) == "no-such-distribution-here is not installed"
    (tmp_path / "pyproject.toml").write_text(pyproject.replace('version = "0.1.0"', 'version = "9.9.9"'))
    assert installed.missing([], tmp_path) == "gatepro_dist 0.1.0 is installed, pyproject.toml says 9.9.9"
