"""run_on_ranks forks its ranks from a forkserver (gatepro_dist/cluster/spawn.py): fresh processes
that see the caller's environment and working directory at the time of the call, not the server's
from when it started, exactly as spawned ones would."""
from __future__ import annotations

import os

from distributed import run_on_ranks
from gatepro_dist.cluster import faults


def _what_the_rank_sees(rank: int, world: int) -> dict:
    return {"variable": os.environ.get("GATEPRO_SPAWN_CHECK"), "cwd": os.getcwd(), "pid": os.getpid(),
            "fault": faults._fault.kind if faults._fault else None}


def test_ranks_see_the_callers_environment_and_directory_set_after_the_server_started(tmp_path, monkeypatch):
    first = run_on_ranks(2, _what_the_rank_sees)  # the server exists from here on, with this environment
    assert [r["variable"] for r in first] == [None, None] and first[0]["fault"] is None
    monkeypatch.setenv("GATEPRO_SPAWN_CHECK", "set-later")
    monkeypatch.setenv(faults.ENV, "hot_expert:expert=0")  # read at import, so re-read in each rank
    monkeypatch.chdir(tmp_path)
    second = run_on_ranks(2, _what_the_rank_sees)
    assert [r["variable"] for r in second] == ["set-later", "set-later"]
    assert [r["cwd"] for r in second] == [str(tmp_path)] * 2
    assert [r["fault"] for r in second] == ["hot_expert", "hot_expert"]
    assert not {r["pid"] for r in first} & {r["pid"] for r in second}  # fresh processes every call
