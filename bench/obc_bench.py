"""One-shot recovery: magnitude masks / round-to-nearest against OBC (``compression.obc``).

For ResNet-20 and the ViT trained on MNIST (zoo cache, trained on first use): the dense
accuracy, then uniform policies on every conv layer (ResNet-20; N:M where the layer offers
it) or every linear layer (ViT): 2:4, 4-bit, 50 % unstructured (``--policies`` adds 3-bit
and 2:4 + 4-bit). Each
policy is scored like a search candidate (``engine.search.Evaluator``: 4 x 64 calibration
images, re-fit on, here on all 1,500 validation images) with

* ``magnitude``: magnitude masks, round-to-nearest;
* ``obc``: Hessians from the compressed model's inputs, layer by layer (the default);
* ``obc dense-H``: Hessians of the dense model's inputs, computed once per job and
  reused (``hessians="dense"``; the OBC result of a layer is then reused whenever its own
  choice repeats, whatever happens upstream).

"s/cand" is the wall time of one candidate (apply, recover, recalibrate, evaluate, count),
"cpu s" its CPU time (this process, one thread: what a shared machine's load does not
inflate), "compress s" the wall time before evaluation. The cache rows time a run of sensitivity-style
probes (the 2:4 policy with one layer changed to 4:8 at a time, last layer first) from a
fresh cache, with and without the job's ``ObcCache``.

    PYTHONPATH=. python -m bench.obc_bench [--models resnet20,vit] [--threads 1] [--probes 6]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from bench.search import load_model
from compression.apply import apply_policy
from compression.evaluate import accuracy
from compression.model_io import CompressibleModel
from compression.obc import ObcCache, recover
from compression.policy import Policy
from compression.scoring import compress
from compression.space_builder import space_for
from engine.device_latency import macs_proxy
from engine.search import Evaluator

OP = {"resnet20": "conv", "vit": "linear"}
POLICIES = ("2:4", "4-bit", "3-bit", "50 % unstructured", "2:4 + 4-bit")


def policies(model: CompressibleModel, op: str) -> dict[str, Policy]:
    layers = [ls for ls in space_for(model).layers if ls.features.op == op]

    def every(spec: dict[str, object]) -> Policy:
        nm = spec.get("scheme") == "nm"
        chosen = [ls.name for ls in layers if not nm or (2, 4) in ls.nm_choices]
        return Policy.from_dict({"layers": {name: spec for name in chosen}})

    return {
        "2:4": every({"scheme": "nm", "nm": [2, 4]}),
        "4-bit": every({"bits": 4}),
        "3-bit": every({"bits": 3}),
        "50 % unstructured": every({"scheme": "unstructured", "sparsity": 0.5}),
        "2:4 + 4-bit": every({"scheme": "nm", "nm": [2, 4], "bits": 4}),
    }


def score(
    ev: Evaluator, policy: Policy, how: str, cache: ObcCache | None = None
) -> tuple[float, float, float, float]:
    """(accuracy, wall seconds for the candidate, wall seconds compressing, CPU seconds)."""
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        if how == "obc dense-H":
            cm = apply_policy(ev.model, policy, fine_grained=False)
            recover(cm, ev.calibration, refit=ev.reconstruct, cache=cache, hessians="dense")
        else:
            cm = compress(
                ev.model,
                policy,
                ev.calibration,
                reconstruct=ev.reconstruct,
                recovery="obc" if how == "obc" else "magnitude",
                cache=cache,
            )
        t_compress = time.perf_counter() - start
        acc = accuracy(cm.gm, ev.x_val, ev.y_val)
        ev.device_latency(cm)
    return acc, time.perf_counter() - start, t_compress, time.process_time() - cpu


def probes(model: CompressibleModel, op: str, count: int) -> list[Policy]:
    base = policies(model, op)["2:4"]
    names = list(base.layers)
    out = []
    for name in reversed(names[-count:]):
        raw = base.to_dict()
        raw["layers"][name] = {"scheme": "nm", "nm": [4, 8]}
        out.append(Policy.from_dict(raw))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="resnet20,vit")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--probes", type=int, default=6)
    parser.add_argument(
        "--policies",
        default="2:4,4-bit,50 % unstructured",
        help=f"comma-separated, of: {', '.join(POLICIES)}",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| model | policy | recovery | accuracy | s/cand | cpu s | compress s |")
    print("|---|---|---|---|---|---|---|")
    for arch in args.models.split(","):
        model, data = load_model(arch)
        ev = Evaluator(model, data, macs_proxy, val_images=1500, seed=0)
        acc, t, tc, cpu = score(ev, Policy.dense(), "magnitude")
        print(f"| {arch} | dense | – | {acc:.4f} | {t:.2f} | {cpu:.2f} | {tc:.2f} |", flush=True)
        dense_cache = ObcCache()  # one per job: the dense Hessians are computed once
        wanted = args.policies.split(",")
        for label, policy in policies(model, OP[arch]).items():
            if label not in wanted:
                continue
            for how in ("magnitude", "obc", "obc dense-H"):
                acc, t, tc, cpu = score(ev, policy, how, dense_cache if how == "obc dense-H" else None)
                print(
                    f"| {arch} | {label} | {how} | {acc:.4f} | {t:.2f} | {cpu:.2f} | {tc:.2f} |", flush=True
                )
        runs = probes(model, OP[arch], args.probes)
        for how, cached in (("magnitude", False), ("obc", False), ("obc", True), ("obc dense-H", True)):
            cache = ObcCache() if cached else None
            if how == "obc dense-H":
                score(ev, Policy.dense(), how, cache)  # the job's one dense pass, not timed
            start, cpu0 = time.perf_counter(), time.process_time()
            accs = [score(ev, p, how, cache)[0] for p in runs]
            per = (time.perf_counter() - start) / len(runs)
            cpu = (time.process_time() - cpu0) / len(runs)
            label = f"{len(runs)} probes, {'cache' if cached else 'no cache'}"
            hits = f" ({cache.hits} layer hits)" if cache is not None else ""
            print(
                f"| {arch} | {label}{hits} | {how} | mean {sum(accs) / len(accs):.4f} "
                f"| {per:.2f} | {cpu:.2f} | – |",
                flush=True,
            )


if __name__ == "__main__":
    main()
