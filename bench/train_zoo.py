"""Train every zoo architecture with its default recipe and print accuracy and time.

Run from the repository root:
``.venv/bin/python -m bench.train_zoo [--data mnist] [--archs resnet56,vit] [--cache DIR]``.
Uses :func:`compression.train.trained_model`, so the weights land in the cache (a fresh
temporary folder unless ``--cache`` is given) and a second run reports the cached figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from compression.data import load_dataset
from compression.train import load_record, trained_model
from compression.zoo import ZOO


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="mnist")
    parser.add_argument("--archs", default=",".join(ZOO))
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    cache = args.cache or Path(tempfile.mkdtemp(prefix="modeltailor-zoo-"))
    for arch in args.archs.split(","):
        start = time.perf_counter()
        cpu_start = time.process_time()
        trained_model(arch, data, seed=0, cache_dir=cache)
        record = load_record(arch, data, seed=0, cache_dir=cache)
        assert record is not None
        row = {
            "arch": arch,
            "dataset": data.name,
            "epochs": record.recipe["epochs"],
            "val_accuracy": round(record.val_accuracy, 4),
            "train_seconds": record.train_seconds,
            "wall_seconds": round(time.perf_counter() - start, 1),
            "cpu_seconds": round(time.process_time() - cpu_start, 1),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
