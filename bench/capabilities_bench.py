"""What this CPU's runtimes accelerate: the channel multiple and per-scheme speed ratios that a
latency calibration measures (``latency_models.capabilities``), repeated to show how steady
the decision is on a shared machine.

    python -m bench.capabilities_bench [--device cpu-ort-1t] [--repeats 3] [--runs 40]

Prints, per repeat, each candidate multiple's kept width, same-run speedup over the dense
64-channel block and channel efficiency (1 = time proportional to kept channels), each
scheme's speedup per probe and the decision (round_to, accelerated / size-only), then a
markdown table for ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu-ort-1t")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from latency_models.calibration_run import local_capabilities
    from latency_models.capabilities import BASE_WIDTH, CANDIDATE_MULTIPLES, width_for
    from latency_models.devices import get_device

    device = get_device(args.device)
    results = []
    for i in range(args.repeats):
        load = os.getloadavg()[0]
        start = time.monotonic()
        caps = local_capabilities(device, runs=args.runs)
        took = time.monotonic() - start
        results.append(caps)
        print(f"repeat {i + 1}: {took:.1f} s, load {load:.1f} -> {os.getloadavg()[0]:.1f}")
        for m in CANDIDATE_MULTIPLES:
            w = width_for(m)
            speedup = caps.ratios.get(f"conv/width/{w}")
            eff = caps.channel_efficiency.get(m)
            if speedup is not None and eff is not None:
                print(
                    f"  multiple {m:2d}: width {w}/{BASE_WIDTH}, speedup {speedup:.3f}, efficiency {eff:.3f}"
                )
        for key, ratio in sorted(caps.ratios.items()):
            if "/scheme/" in key:
                print(f"  {key}: {ratio:.3f}x dense")
        print(
            f"  -> round_to {caps.round_to}; accelerated {list(caps.accelerated_schemes)}; "
            f"size-only {sorted(caps.size_only)}"
        )

    print(f"\n| figure ({args.device}, {args.repeats} repeats, {args.runs} runs) | median | range |")
    print("|---|---|---|")
    for m in CANDIDATE_MULTIPLES:
        values = [c.channel_efficiency[m] for c in results if m in c.channel_efficiency]
        if values:
            print(
                f"| efficiency, width {width_for(m)} (multiple of {m}) | {statistics.median(values):.2f} | "
                f"{min(values):.2f}–{max(values):.2f} |"
            )
    for name in results[0].measured_schemes:
        values = [c.scheme_speedups[name] for c in results if name in c.scheme_speedups]
        print(
            f"| speedup over dense, {name} | {statistics.median(values):.2f}x | "
            f"{min(values):.2f}–{max(values):.2f} |"
        )
    print(f"| round_to chosen | {', '.join(str(c.round_to) for c in results)} | |")
    print(f"| size-only | {'; '.join(','.join(sorted(c.size_only)) for c in results)} | |")


if __name__ == "__main__":
    main()
