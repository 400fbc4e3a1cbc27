"""The README's quickstart learns: validation loss ends well below the byte-unigram entropy."""
from __future__ import annotations

import pytest

from pathlib import Path

from gatepro_dist.config import load_config
from gatepro_dist.config_checks import validate
from gatepro_dist.train.parallel import single_process_groups
from gatepro_dist.train.engine import train
from gatepro_dist.train.step import load_data


QUICKSTART = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


@pytest.mark.slow
def test_quickstart_model_learns_beyond_unigram_statistics(tmp_path):
    # The quickstart's model and data, shortened (one process, 200 steps) to fit the test budget.
    cfg = validate(load_config(str(QUICKSTART), [
        "parallel.ep=1", "train.steps=200", "train.eval_every=200", "train.eval_batches=8",
        "train.save_every=1000", "train.progress=false", f"train.run_dir={tmp_path}"]), 1)
    data = load_data(cfg)
    unigram = data.val.unigram_entropy()
    result = train(cfg, single_process_groups(), data=data, log=lambda *_: None)
    assert result.val_loss < unigram - 0.5, (result.val_loss, unigram)
    assert (tmp_path / "metrics.jsonl").is_file()
