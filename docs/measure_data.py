"""The data-path measurements of docs/data.md. Run from the repository root:

    python docs/measure_data.py startup RUN_DIR SOURCE   # launch -> step 1, peak host memory of gatepro-train
    python docs/measure_data.py loader SOURCE             # loader tokens/s on the quickstart's batches
    python docs/measure_data.py train RUN_DIR SOURCE      # training tokens/s, same model and batches

SOURCE is anything data.source takes; the model is configs/quickstart.yaml at parallel.ep=1 with
model.vocab_size=257 (bytes plus the end-of-document id of `tokenize --tokenizer bytes`).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

MODEL = ["configs/quickstart.yaml", "parallel.ep=1", "model.vocab_size=257"]


def startup(run_dir: str, source: str) -> dict:
    """gatepro-train for 2 steps; seconds from launch until metrics.jsonl has its first line (step 1)."""
    command = ["gatepro-train", *MODEL, f"data.source={source}", f"train.run_dir={run_dir}", "train.resume=none",
               "train.steps=2", "train.eval_batches=1", "train.progress=false"]
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, first = os.path.join(run_dir, "metrics.jsonl"), None
    while proc.poll() is None:
        if first is None and os.path.exists(metrics) and os.path.getsize(metrics) > 0:
            first = time.monotonic() - start
        time.sleep(0.02)
    if proc.returncode:
        raise SystemExit(proc.stderr.read()[-2000:])
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # this script's only child
    return {"source": source, "launch_to_step1_s": round(first, 2), "peak_rss_mib": round(peak_mib, 1)}


def loader(source: str, steps: int = 300) -> dict:
    from gatepro_dist.config import load_config
    from gatepro_dist.train.step import load_data

    cfg = load_config(MODEL[0], [*MODEL[1:], f"data.source={source}"])
    data = load_data(cfg)
    sampler = data.train.make_sampler(cfg.train.global_batch_size, cfg.train.seed)
    tokens, start = 0, time.perf_counter()
    for step in range(steps):
        inputs, _ = data.train.batch(sampler.global_batch(step))
        tokens += inputs.numel()
    return {"source": source, "loader_tokens_per_s": round(tokens / (time.perf_counter() - start))}


def train(run_dir: str, source: str, steps: int = 12) -> dict:
    """Training tokens/s of steps 3.. (the first two warm up), from the run's metrics.jsonl."""
    subprocess.run(["gatepro-train", *MODEL, f"data.source={source}", f"train.run_dir={run_dir}", "train.resume=none",
                    f"train.steps={steps}", "train.eval_every=1000", "train.save_every=1000", "train.progress=false"],
                   check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rates = [json.loads(line)["tokens_per_s"] for line in fh][2:]
    return {"source": source, "train_tokens_per_s": round(sum(rates) / len(rates))}


if __name__ == "__main__":
    what, *args = sys.argv[1:]
    print(json.dumps({"startup": startup, "loader": loader, "train": train}[what](*args)))
