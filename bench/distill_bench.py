"""One-shot against distillation-fine-tuned accuracy of compressed ResNet-20 points, and the time.

Each policy is built and fine-tuned exactly as a job's fine-tuning phase does it
(``engine.finetune_front.FrontFinetuner`` with the job's default ``FinetuneSpec``: 2 epochs
over the MNIST train split: 110 steps of 128 images), scored on the
search's 1,000 validation images before and after. The seconds per point are build +
one-shot score + fine-tune + re-score; a job's default phase fine-tunes 5 points (the
first shares the teacher's logits with the rest, so it is the slowest).

    MODELTAILOR_DATA_DIR=... PYTHONPATH=. python -m bench.distill_bench [--policies w50,...] [--epochs 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from bench.search import load_model
from compression.policy import Policy
from engine.finetune_front import FrontFinetuner
from engine.spec import FinetuneSpec

POLICIES: dict[str, dict[str, object]] = {
    "w50": {"default": {"width": 0.5}},
    "w50-int8": {"default": {"width": 0.5, "bits": 8}},
    "w75-2:4": {"default": {"width": 0.75, "scheme": "nm", "nm": [2, 4]}},
    "block88": {"default": {"scheme": "block", "sparsity": 0.88, "block": 8}},
    "w50-int4": {"default": {"width": 0.5, "bits": 4}},
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--epochs", type=float, default=FinetuneSpec().epochs)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, data = load_model(args.model)
    spec = FinetuneSpec(top_k=1, epochs=args.epochs)
    start = time.perf_counter()
    tuner = FrontFinetuner(model, data, spec, seed=0, reconstruct=True)
    print(
        f"{args.model}: {tuner.steps} steps of {tuner.config.batch_size} images a point "
        f"({args.epochs} epochs)"
    )
    print(f"{'policy':<10} {'one-shot':>9} {'fine-tuned':>10} {'gain pts':>9} {'seconds':>8}")
    for name in args.policies.split(","):
        t0 = time.perf_counter()
        point = tuner.run(Policy.from_dict(POLICIES[name]))
        assert point is not None
        tuned = point.finetuned_accuracy
        gain = "" if tuned is None else f"{100 * (tuned - point.one_shot_accuracy):+.1f}"
        shown = "failed" if tuned is None else f"{tuned:.4f}"
        seconds = time.perf_counter() - t0
        print(f"{name:<10} {point.one_shot_accuracy:>9.4f} {shown:>10} {gain:>9} {seconds:>8.1f}", flush=True)
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
