"""The table of bad inputs: configs, overrides, data and checkpoint paths, launch environments.

Each row is run through `gatepro-train`'s real entry point (in this process: `main` returns the
exit code the console script exits with; tests/test_cli.py runs a few as separate processes) and
must give exit code 2, exactly the expected single line on stderr, and leave the working
directory byte-for-byte as it was: nothing created, nothing overwritten.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from gatepro_dist.cli.train import main
from test_trainer import TINY, run_training

E = "gatepro-train: error: "
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "GATEPRO_FAULT")
TORCHRUN_2 = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}


def source_fix(key: str) -> str:
    return (f"point {key} at text, .jsonl, token shards (.bin/.npy), a gatepro-convert tokenize directory or a "
            "Megatron prefix, or use 'stdlib'")


def write_bad_data(root: Path) -> None:
    """The data files the table's data rows point at (under root/data)."""
    data = root / "data"
    (data / "empty_dir").mkdir(parents=True)
    (data / "odd.bin").write_bytes(b"\x01\x02\x03")
    (data / "mixed").mkdir()
    np.save(data / "mixed" / "a.npy", np.arange(100, dtype=np.uint16))
    np.save(data / "mixed" / "b.npy", np.arange(100, dtype=np.uint32))
    np.save(data / "big_ids.npy", np.tile(np.array([1, 2, 300], dtype=np.uint16), 100))
    (data / "docs.jsonl").write_text('{"text": "one document"}\n{"id": 2, "body": "no text key"}\n')


# (id, overrides, environment, expected stderr line). {tmp} is the test's working directory;
# {run} is a finished tiny run there (checkpoint at step 2), {ckpt} its checkpoint.
TABLE = [
    ("unknown key", ["moe.topk=3"], {},
     "unknown config key 'moe.topk' (override 'moe.topk=3'); did you mean 'moe.top_k'?"),
    ("unknown section", ["optim.lr=1"], {},
     "unknown config key 'optim.lr' (override 'optim.lr=1'); did you mean 'train.lr'?"),
    ("a section set as a key", ["moe=3"], {},
     "'moe' is a section, not a key (override 'moe=3'); set one of its keys, e.g. moe.num_experts=..."),
    ("override without =", ["no_equals_sign"], {},
     "override 'no_equals_sign' has no '='; write it as key=value, e.g. train.steps=..."),
    ("wrong type", ["moe.top_k=abc"], {},
     "moe.top_k: expected int, got str 'abc' (override 'moe.top_k=abc'); set moe.top_k to a value of type "
     "int, e.g. moe.top_k=2"),
    ("float for an int", ["train.steps=1.5"], {},
     "train.steps: expected int, got float 1.5 (override 'train.steps=1.5'); set train.steps to a value of "
     "type int, e.g. train.steps=300"),
    ("zero steps", ["train.steps=0"], {}, "train.steps=0 must be > 0; set train.steps to a positive value"),
    ("negative learning rate", ["train.lr=-1"], {}, "train.lr=-1.0 must be > 0; set train.lr to a positive value"),
    ("top-k above the experts", ["moe.top_k=9"], {},
     "moe.top_k=9 must be between 1 and moe.num_experts=8; choose 1 <= moe.top_k <= 8"),
    ("top-k zero", ["moe.top_k=0"], {},
     "moe.top_k=0 must be between 1 and moe.num_experts=8; choose 1 <= moe.top_k <= 8"),
    ("negative penalty", ["router.gatepro.penalty=-1e-4"], {},
     "router.gatepro.penalty=-0.0001 must be >= 0; set router.gatepro.penalty to zero or more"),
    ("negative router init", ["router.init_std=-0.1"], {},
     "router.init_std=-0.1 must be >= 0; set router.init_std to zero or more"),
    ("nondeterministic cuBLAS workspace", ["train.deterministic=true"], {"CUBLAS_WORKSPACE_CONFIG": ":0:0"},
     "train.deterministic=true needs CUBLAS_WORKSPACE_CONFIG in (':4096:8', ':16:8') on CUDA, but the environment "
     "has ':0:0'; unset it or set CUBLAS_WORKSPACE_CONFIG=:4096:8"),
    ("NaN penalty", ["router.gatepro.penalty=.nan"], {},
     "router.gatepro.penalty=nan is not finite; set router.gatepro.penalty to a finite number"),
    ("infinite penalty", ["router.gatepro.penalty=.inf"], {},
     "router.gatepro.penalty=inf is not finite; set router.gatepro.penalty to a finite number"),
    ("not a choice", ["train.dtype=fp8"], {},
     "train.dtype: 'fp8' is not a valid choice (override 'train.dtype=fp8'); choose one of 'fp32', 'bf16'"),
    ("unknown nan policy", ["train.nan_policy=ignore"], {},
     "train.nan_policy: 'ignore' is not a valid choice (override 'train.nan_policy=ignore'); choose one of "
     "'skip', 'stop'"),
    ("validation share", ["data.val_fraction=0.9"], {},
     "data.val_fraction=0.9 is outside (0.0, 0.5]; choose data.val_fraction in (0.0, 0.5]"),
    ("kv heads", ["model.n_kv_heads=3"], {},
     "model.n_kv_heads=3 does not divide model.n_heads=2; choose model.n_kv_heads that divides model.n_heads"),
    ("bf16 grouped GEMM: d_model not 16-byte rows", ["train.dtype=bf16", "model.d_model=36"], {},
     "model.d_model=36 is not a multiple of 8, which the bf16 grouped GEMM needs (16-byte rows); set "
     "model.d_model=40 (the nearest multiple of 8), or moe.grouped_gemm=false, or train.dtype=fp32"),
    ("bf16 grouped GEMM: expert width not 16-byte rows", ["train.dtype=bf16", "moe.expert_ffn_dim=27"], {},
     "moe.expert_ffn_dim=27 is not a multiple of 8, which the bf16 grouped GEMM needs (16-byte rows); set "
     "moe.expert_ffn_dim=24 (the nearest multiple of 8), or moe.grouped_gemm=false, or train.dtype=fp32"),
    ("sequence longer than RoPE", ["data.seq_len=128"], {},
     "data.seq_len=128 exceeds model.max_seq_len=64; lower data.seq_len or raise model.max_seq_len"),
    ("GatePro schedule out of order", ["router.gatepro.schedule=[[5, true], [3, false]]"], {},
     "router.gatepro.schedule[1]=[3, False] does not come after step 5; list router.gatepro.schedule entries "
     "with strictly increasing steps"),
    ("ep does not divide the world", ["parallel.ep=2"], {**TORCHRUN_2, "WORLD_SIZE": "3"},
     "parallel.ep=2 does not divide the world size 3; choose parallel.ep from the divisors of 3"),
    ("experts not divisible by ep", ["parallel.ep=3"], {**TORCHRUN_2, "WORLD_SIZE": "3"},
     "moe.num_experts=8 is not divisible by parallel.ep=3; choose parallel.ep that divides moe.num_experts"),
    ("dp_shard on one process", ["parallel.dp_shard=true"], {},
     "parallel.dp_shard=True shards over the ranks of the job and this job has one process; set "
     "parallel.dp_shard=false, or launch 2 or more processes (torchrun --nproc-per-node=N)"),
    ("dp_shard with DeepSpeed", ["parallel.dp_shard=true", "train.backend=deepspeed"], TORCHRUN_2,
     "parallel.dp_shard=True is the native engine's FSDP2 sharding; DeepSpeed shards with ZeRO; set "
     "parallel.dp_shard=false and choose deepspeed.zero_stage, or train.backend=native"),
    ("batch not divisible by the world", ["train.global_batch_size=6"], {**TORCHRUN_2, "WORLD_SIZE": "4"},
     "train.global_batch_size=6 is not divisible by world_size*train.grad_accum=4*1; use a multiple of 4"),
    ("missing config file", ["@missing.yaml"], {},
     "config file 'missing.yaml' does not exist; pass the path to a YAML file (e.g. configs/quickstart.yaml)"),
    ("config is not YAML", ["@broken.yaml"], {},
     "config file 'broken.yaml' is not valid YAML at line 2, column 14: mapping values are not allowed here; "
     "fix the syntax there"),
    ("config is a list", ["@list.yaml"], {},
     "config file 'list.yaml' must contain a mapping of sections (model, moe, router, parallel, data, train), "
     "got list; write them as top-level keys, as in configs/quickstart.yaml"),
    ("corpus does not exist", ["data.source=/nonexistent/corpus"], {},
     "data.source='/nonexistent/corpus' is neither 'stdlib' nor an existing path; " + source_fix("data.source")),
    ("empty corpus", ["data.source={tmp}/empty.txt"], {},
     "data.source='{tmp}/empty.txt' is an empty file; " + source_fix("data.source")),
    ("empty corpus directory", ["data.source={tmp}/data/empty_dir"], {},
     "data.source='{tmp}/data/empty_dir' is an empty directory; " + source_fix("data.source")),
    ("binary garbage corpus", ["data.source={tmp}/garbage.txt"], {},
     "text file {tmp}/garbage.txt looks binary (over 30% control bytes); pre-tokenized data must be a .bin "
     "(uint16/uint32), .npy or Megatron .bin+.idx token file"),
    ("shard size not a multiple of its dtype", ["data.source={tmp}/data/odd.bin"], {},
     "token file {tmp}/data/odd.bin has 3 bytes, not a multiple of 2 for uint16; set bin_dtype (data.bin_dtype) "
     "to the dtype it was written with"),
    ("mixed dtypes in one source", ["data.source={tmp}/data/mixed"], {},
     "data source {tmp}/data/mixed mixes token dtypes: {tmp}/data/mixed/a.npy is uint16 but "
     "{tmp}/data/mixed/b.npy is uint32; convert them to one dtype or list them as separate data.mix entries"),
    ("token id outside the vocabulary", ["data.source={tmp}/data/big_ids.npy"], {},
     "data source 1 uint16 token file(s): {tmp}/data/big_ids.npy contains token id 300, outside vocab_size=256; "
     "raise model.vocab_size to at least 301"),
    ("mixture weight not positive", ["data.mix=[{{source: stdlib, weight: 1}}, {{source: stdlib, weight: 0}}]"], {},
     "data.mix[1].weight=0.0 must be > 0; give every mixture entry a positive weight (they are normalised to "
     "sum to 1)"),
    ("jsonl line without the text key", ["data.source={tmp}/data/docs.jsonl"], {},
     "{tmp}/data/docs.jsonl:2 has no string under the text key 'text' (found: body, id); set data.text_key "
     "(or --text-key) to the field that holds the text"),
    ("document mask without an end-of-document id", ["data.document_mask=true"], {},
     "data.document_mask=true needs an end-of-document token id, and the data source names none; set "
     "data.eos_id, or tokenize the corpus with gatepro-convert tokenize (its manifest names one)"),
    ("held-out source missing", ["data.val_source=/nonexistent/val"], {},
     "data.val_source='/nonexistent/val' is neither 'stdlib' nor an existing path; " + source_fix("data.val_source")),
    ("run_dir is a file", ["train.run_dir={tmp}/empty.txt"], {},
     "train.run_dir='{tmp}/empty.txt' exists and is a file; choose a directory path or remove the file"),
    ("run_dir not writable", ["train.run_dir=/proc/forbidden/run"], {},
     "train.run_dir='/proc/forbidden/run' cannot be written: '/proc' is not writable; choose a writable "
     "location or fix its permissions"),
    ("tokenizer missing", ["data.tokenizer=/nonexistent/tokenizer.json"], {},
     "data.tokenizer='/nonexistent/tokenizer.json' is not an existing file; point data.tokenizer at a local "
     "tokenizer.json, or set it to null for bytes"),
    ("DeepSpeed JSON missing", ["deepspeed.config_path=/nonexistent/ds.json"], {},
     "deepspeed.config_path='/nonexistent/ds.json' does not exist; point it at a DeepSpeed JSON file or set it "
     "to null"),
    ("resume path missing", ["train.resume=/nonexistent/ckpt"], {},
     "train.resume='/nonexistent/ckpt' is neither 'none', 'auto' nor an existing checkpoint path; pass 'none', "
     "'auto' or the path of a saved checkpoint directory"),
    ("resume an unfinished save", ["train.run_dir={tmp}/new", "train.resume={run}/checkpoints/step_00000004.partial"],
     {}, "{run}/checkpoints/step_00000004.partial is not a complete checkpoint (no manifest.json); point "
     "train.resume at a directory under checkpoints/ or use train.resume=auto"),
    ("checkpoint of another model shape", ["train.run_dir={tmp}/new", "train.resume={ckpt}", "model.d_model=64"], {},
     "checkpoint {ckpt} has model.d_model=32 but the config says 64; resume with the checkpoint's model shape "
     "or start a new run_dir"),
    ("auto-resume into another model shape", ["train.run_dir={run}", "train.resume=auto", "moe.num_experts=16"],
     {}, "checkpoint {ckpt} has moe.num_experts=8 but the config says 16; resume with the checkpoint's model "
     "shape or start a new run_dir"),
    ("fresh run over an existing one", ["train.run_dir={run}"], {},
     "train.run_dir={run} already holds a run; continue it with train.resume=auto, or choose a new "
     "train.run_dir (nothing was changed)"),
    ("unreadable manifest", ["train.run_dir={tmp}/new", "train.resume={run}/checkpoints/garbled"], {},
     "{run}/checkpoints/garbled/manifest.json cannot be read (Expecting value: line 1 column 1 (char 0)); the "
     "checkpoint is damaged: resume from another one (train.resume=auto falls back to the newest intact one)"),
    ("MASTER_ADDR does not resolve", [], {**TORCHRUN_2, "MASTER_ADDR": "no-such-host.invalid"},
     "MASTER_ADDR 'no-such-host.invalid' (from torchrun) does not resolve to an address; set MASTER_ADDR to "
     "the first node's hostname or IP"),
    ("RANK/WORLD_SIZE without MASTER_ADDR", [], {**TORCHRUN_2, "MASTER_ADDR": None},
     "torchrun set RANK/WORLD_SIZE but not MASTER_ADDR; export MASTER_ADDR=<rank 0's host> and MASTER_PORT"),
    ("WORLD_SIZE not a number", [], {**TORCHRUN_2, "WORLD_SIZE": "abc"},
     "WORLD_SIZE='abc' is not an integer; fix or unset it"),
    ("RANK outside the world", [], {**TORCHRUN_2, "RANK": "2"},
     "torchrun says rank 2 of world size 2; the launcher's variables are inconsistent (stale exports in "
     "your shell?)"),
    ("malformed fault injection", [], {"GATEPRO_FAULT": "explode:step=1"},
     "GATEPRO_FAULT='explode:step=1': unknown fault kind 'explode'; use one of kill, nan, inf_grad, hot_expert"),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny run with a complete checkpoint at step 2, an unfinished save of step 4 and a
    checkpoint directory whose manifest is garbage."""
    run = tmp_path_factory.mktemp("finished") / "run"
    run_training(1, run, "train.steps=2", "train.save_every=2")
    (run / "checkpoints" / "step_00000004.partial").mkdir()
    garbled = run / "checkpoints" / "garbled"
    shutil.copytree(run / "checkpoints" / "step_00000002", garbled)
    (garbled / "manifest.json").write_text("")
    return run


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("name, overrides, environment, expected", TABLE, ids=[row[0] for row in TABLE])
def test_bad_input_is_refused_with_one_exact_line_and_nothing_changes(
        name, overrides, environment, expected, finished_run, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "garbage.txt").write_bytes(bytes(range(32)) * 4000)
    (tmp_path / "broken.yaml").write_text("model:\n  d_model: 32: 4\n")
    (tmp_path / "list.yaml").write_text("- model\n- moe\n")
    write_bad_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    for key in LAUNCH_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    for key, value in environment.items():
        if value is not None:
            monkeypatch.setenv(key, value)
    import gatepro_dist.cluster.faults as faults
    monkeypatch.setattr(faults, "_problem", None)
    faults.install(environment.get("GATEPRO_FAULT"))
    try:
        before = snapshot(tmp_path)
        fill = dict(tmp=tmp_path, run=run, ckpt=run / "checkpoints" / "step_00000002")
        args = [a.format(**fill) for a in overrides]
        config = [a[1:] for a in args if a.startswith("@")]
        overrides = [a for a in args if not a.startswith("@")]
        run_dir = [] if any(a.startswith("train.run_dir=") for a in overrides) else ["train.run_dir=out"]
        code = main([*config, *TINY, *run_dir, *overrides])
    finally:
        faults.install(None)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err == [E + expected.format(**fill)]
    assert snapshot(tmp_path) == before, "a refused run must not create or change any file"


def test_the_table_covers_at_least_25_inputs():
    assert len(TABLE) >= 25 and len({row[0] for row in TABLE}) == len(TABLE)
