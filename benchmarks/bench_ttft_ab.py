"""TTFT of cluster settings side by side: the unified daemon and `dcpd cluster --prefill 1 --decode 1`
variants, alternating in one run.

    python benchmarks/bench_ttft_ab.py [--json] [--rounds 4] [--requests 5] \
        [--variant disagg.push_nice=0] [--variant disagg.push_nice=10]

The measurement is `bench_transfer.py`'s (the same random 8-layer Llama, a
fresh random 2,048-token prompt per request, streamed, client-side time to the
first token chunk, every daemon with `--threads` compute threads); each round
starts the unified daemon and then each variant's cluster (its `--variant`
items passed to every daemon as `--set`), one warm-up request each, then
`--requests` timed ones. Medians; each variant's ratio to the unified median.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import tempfile

from bench_transfer import TOKENS, build_checkpoint, measure_ttft, start_cluster, start_unified
from report import emit  # benchmarks/report.py (the script's folder is on sys.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="compute threads of every daemon")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="a cluster variant: --set items for its daemons (repeat for more variants)")  # fmt: skip
    args = parser.parse_args()
    variants = {name: tuple(name.split(",")) for name in args.variant or ["disagg.push_nice=10"]}
    ttfts: dict[str, list[float]] = {"unified": [], **{name: [] for name in variants}}
    with tempfile.TemporaryDirectory(prefix="dcpab", dir="/tmp") as tmp:
        model = f"{tmp}/model"
        build_checkpoint(model)
        for r in range(args.rounds):
            for name in ttfts:
                if name == "unified":
                    proc, endpoint = start_unified(model, tmp, args.threads)
                else:
                    proc, endpoint = start_cluster(model, tmp, args.threads, variants[name])
                try:
                    asyncio.run(measure_ttft(endpoint, 1, TOKENS, seed=999))  # warm-up
                    ttfts[name] += asyncio.run(measure_ttft(endpoint, args.requests, TOKENS, seed=r))
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(120)
    unified = statistics.median(ttfts["unified"])
    result: dict[str, object] = {"rounds": args.rounds, "requests": args.requests, "threads": args.threads,
                                 "prompt_tokens": TOKENS, "unified_ttft_ms": unified * 1e3}  # fmt: skip
    for name in variants:
        median = statistics.median(ttfts[name])
        result[f"{name}_ttft_ms"] = median * 1e3
        result[f"{name}_ratio_vs_unified"] = median / unified
    emit(result, args.json)


if __name__ == "__main__":
    main()
