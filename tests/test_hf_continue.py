"""A converted Hugging Face model continues training under torchrun at ep=2 with GatePro hot-swapped in.

The run starts where the HF model is (its first loss is the HF model's loss on the same batch),
GatePro's switch on and off shows in the metrics, and the trained checkpoint exports back to a
directory `transformers` loads and that computes what our model computes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from gatepro_dist.train.checkpoint import latest_checkpoint, load_checkpoint, read_manifest  # noqa: E402
from gatepro_dist.config import load_config  # noqa: E402
from gatepro_dist.train.data import GlobalBatchSampler  # noqa: E402
from gatepro_dist.hf import export_hf, import_hf  # noqa: E402
from gatepro_dist.hf.tiny import save_tiny_model, tiny_text  # noqa: E402
from gatepro_dist.train.model import Transformer  # noqa: E402
from gatepro_dist.train.parallel import single_process_groups  # noqa: E402
from gatepro_dist.train.step import load_data  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RUN = ["data.seq_len=16", "train.global_batch_size=4", "train.steps=3", "train.save_every=3",
       "train.eval_every=1000", "train.eval_batches=1", "train.stats_every=1", "train.progress=false",
       "train.lr=1e-3", "train.warmup_steps=0", "router.gatepro.schedule=[[0, true], [2, false]]"]


def hf_loss_on_first_batch(hf_dir: Path, config_path: Path) -> float:
    """The HF model's mean next-token loss on the global batch the trainer's step 1 uses."""
    cfg = load_config(str(config_path), [])
    data = load_data(cfg)
    sampler = GlobalBatchSampler(len(data.train), cfg.train.global_batch_size, 1, 0, cfg.train.seed)
    inputs, targets = data.train.batch(sampler.global_batch(0))
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(inputs).logits
    return float(F.cross_entropy(logits.flatten(0, 1), targets.flatten()))


def test_converted_model_continues_under_torchrun_at_ep2_with_gatepro(tmp_path):
    hf_dir = save_tiny_model("qwen2_moe", tmp_path / "hf")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(tiny_text())
    run = import_hf(hf_dir, tmp_path / "run", config_path=str(CONFIGS / "continue_gatepro.yaml"),
                    overrides=[f"data.source={corpus}", *RUN])
    expected_first_loss = hf_loss_on_first_batch(hf_dir, run.config_path)

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "gatepro_dist.cli.train", str(run.config_path), "parallel.ep=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "weights only: fresh optimizer, step 0" in proc.stdout

    records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    # It starts where the HF model is: GatePro's lambda = 1e-4 moves some logits by 1e-4 (and so
    # mixture weights by about that much), so the first loss (before any update) equals the HF
    # model's loss on the same batch to ~1e-5 relative.
    print(f"\nfirst loss {records[0]['loss']:.7f}, HF loss on the same batch {expected_first_loss:.7f}")
    assert abs(records[0]["loss"] - expected_first_loss) <= 1e-4 * expected_first_loss
    # The hot swap: on for steps 1-2, off from step 3, visible per layer.
    assert [r["gatepro"] for r in records] == [True, True, False]
    assert [all(layer["gatepro_penalised"] > 0 for layer in r["moe"]) for r in records] == [True, True, False]
    assert all(layer["gatepro_penalised"] == 0 for layer in records[2]["moe"])
    assert all("similarity" in layer for r in records for layer in r["moe"])

    trained = latest_checkpoint(run.run_dir)
    manifest = read_manifest(trained)
    assert (trained.name, manifest["kind"], manifest["ep"]) == ("step_00000003", "full", 2)

    # Export the trained checkpoint (saved at ep=2) and check transformers computes our function.
    export_hf(run.run_dir, tmp_path / "trained-hf")
    cfg = load_config(str(run.config_path), ["parallel.ep=1", "router.gatepro.enabled=false",
                                             "router.gatepro.schedule=[]"])  # GatePro off: plain top-k
    model = Transformer(cfg).eval()
    load_checkpoint(trained, model, None, single_process_groups())
    tokens = torch.arange(32).view(2, 16) % cfg.model.vocab_size
    with torch.no_grad():
        ours = model(tokens)[0]
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "trained-hf").eval()(tokens).logits
    assert float((ours - theirs).abs().max()) <= 1e-5
    original = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        assert float((original(tokens).logits - theirs).abs().max()) > 1e-3, "training must have moved the weights"
