"""mpirun -n 2 with the PyPI Open MPI wheel: ranks from OMPI_COMM_WORLD_*, rank 0's address
broadcast with mpi4py, ep=2 training that reproduces the torchrun losses."""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys

import pytest

from launch_helpers import assert_same_losses, clean_env, losses, run, train_args


@pytest.fixture(scope="module")
def mpirun() -> str:
    """The Open MPI wheel's mpirun, installed through the project's own installer if missing."""
    bindir = os.path.dirname(sys.executable)
    if importlib.util.find_spec("mpi4py") is None or shutil.which("mpirun", path=bindir) is None:
        proc = run(["bash", "launch/install.sh"], clean_env(GATEPRO_EXTRAS="mpi"), timeout=900)
        assert proc.returncode == 0, f"GATEPRO_EXTRAS=mpi launch/install.sh failed:\n{proc.stderr[-3000:]}"
        importlib.invalidate_caches()
    path = shutil.which("mpirun", path=bindir) or shutil.which("mpirun")
    assert path, "launch/install.sh with GATEPRO_EXTRAS=mpi did not provide mpirun"
    return path


@pytest.mark.slow
def test_mpirun_two_ranks_train_ep2_with_the_torchrun_losses(tmp_path, mpirun):
    run_dir = tmp_path / "run"
    proc = run(["bash", "launch/mpirun.sh", *train_args(run_dir)], clean_env(NP="2", MPIRUN=mpirun), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # No MASTER_ADDR was given: rank 0 found every rank on one host and broadcast 127.0.0.1 + a port.
    assert "rank map (openmpi; world 2 = dp 1 x ep 2; rendezvous 127.0.0.1:" in proc.stdout
    assert_same_losses(losses(run_dir))
