"""The README's "Your own data" commands, run as written (tokenize, train with document masking,
evaluate on held-out text), in a directory holding what they read: configs/ and docs/. Only the
training length is shortened, by overrides appended to the train command."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHORTEN = ["train.steps=2", "train.eval_every=2", "train.eval_batches=1", "train.save_every=2", "train.progress=false"]


def own_data_commands() -> list[list[str]]:
    section = (ROOT / "README.md").read_text().split("## Your own data", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [shlex.split(line) for line in lines if line and not line.startswith("#")]


def test_the_section_tokenizes_trains_and_evaluates():
    commands = own_data_commands()
    assert [c[:2] for c in commands] == [["gatepro-convert", "tokenize"]] * 2 + [["gatepro-train", "configs/quickstart.yaml"]]
    assert "data.val_source=data/held_out" in commands[2] and "data.document_mask=true" in commands[2]


@pytest.mark.slow
def test_the_own_data_commands_run_as_written(tmp_path):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    shutil.copytree(ROOT / "docs", tmp_path / "docs", ignore=shutil.ignore_patterns("results"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    outputs = []
    for command in own_data_commands():
        if command[0] == "gatepro-train":
            command = [*command, *SHORTEN]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        outputs.append(done.stdout)
    train_manifest = json.loads((tmp_path / "data" / "stdlib" / "manifest.json").read_text())
    assert train_manifest["tokens"] <= 5_000_000 and train_manifest["left_out"]["bytes_left_out"] > 0
    assert "left out" in outputs[0]
    held_out = json.loads((tmp_path / "data" / "held_out" / "manifest.json").read_text())
    assert held_out["documents"] == len(list((tmp_path / "docs").glob("*.md")))
    records = [json.loads(line) for line in (tmp_path / "runs" / "own_data" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and "val_loss" in records[-1]
    config = (tmp_path / "runs" / "own_data" / "config.yaml").read_text()
    assert "eos_id: 256" in config and "document_mask: true" in config  # the manifest's end-of-document id
    assert f"val loss {records[-1]['val_loss']:.4f}" in outputs[2]
