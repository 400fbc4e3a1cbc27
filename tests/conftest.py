"""The suite does not hide failures behind skips.

CI (tests/run.sh) installs everything the suite needs: DeepSpeed, Megatron-core, transformers,
tokenizers, TensorBoard, mpi4py + Open MPI, Slurm, and it runs as root (network namespaces,
tmpfs mounts). A test that skips there is a test that did not run, which is a failure that looks
like a pass. So every skip, everywhere, fails the run (exit code 1) unless the test is on the
allow-list below, with the reason it may legitimately skip on some machine. Enforced always, not
only under CI=true: developers' machines and CI are the same kind of machine, and a skip that
passes locally would pass in CI too. The run ends with the list of every skip and its reason.

To add an entry: the test's node id (as pytest prints it, without parameters to allow every
parametrisation) and why the environment, not the code, decides whether it can run.
"""
from __future__ import annotations

import pytest

ALLOWED_SKIPS: dict[str, str] = {
    "tests/test_launch.py::test_docker_compose_config_accepts_the_file":
        "needs the Docker CLI with the compose plugin; CPU CI machines have no Docker engine (images are "
        "built and run with podman in tests/test_docker.py); the compose YAML is checked without it",
}

_skips: list[tuple[str, str, bool]] = []  # (node id, reason, allowed)


def pytest_sessionstart(session):
    # pyproject.toml's `timeout` is what turns a hung collective (a rank that never joins an
    # all-to-all) into one failed test instead of a CI job that stalls until it is killed; without
    # pytest-timeout that line is silently ignored. So its absence fails the run at once.
    if not session.config.pluginmanager.has_plugin("timeout"):
        raise pytest.UsageError(
            "pytest-timeout is missing or disabled (-p no:timeout), so no test would time out: "
            "pip install pytest-timeout (bash tests/run.sh installs it)")
    # The fake accelerator's device must exist for autograd before the suite's first backward.
    from fake_accelerator import prime_autograd_engine

    prime_autograd_engine()


def _allowed(nodeid: str) -> bool:
    return nodeid in ALLOWED_SKIPS or nodeid.split("[", 1)[0] in ALLOWED_SKIPS


def _reason(report) -> str:
    if isinstance(report.longrepr, tuple):  # (file, line, "Skipped: why")
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return str(report.longrepr)


def _record(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):  # an expected failure is not a skip
        _skips.append((report.nodeid, _reason(report), _allowed(report.nodeid)))


def pytest_runtest_logreport(report):
    _record(report)


def pytest_collectreport(report):  # a module-level pytest.importorskip skips the whole file here
    _record(report)


def unexpected_skips() -> list[tuple[str, str]]:
    return [(nodeid, reason) for nodeid, reason, allowed in _skips if not allowed]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    # 0 (all passed) and 5 (nothing ran: every module skipped) become 1 (tests failed); other
    # failures keep their own code.
    if unexpected_skips() and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    write = terminalreporter.write_line
    terminalreporter.section("skips")
    if not _skips:
        write("no test skipped")
        return
    for nodeid, reason, allowed in _skips:
        write(f"{'allowed   ' if allowed else 'UNEXPECTED'} {nodeid}: {reason}")
    bad = unexpected_skips()
    if bad:
        write(f"{len(bad)} skip(s) not on the allow-list in tests/conftest.py: the run fails (exit code 1). "
              "Install what they need (bash tests/run.sh does) or fix the test.", red=True)
