"""The A/B rollout's numbers (docs/rollout.md):

1. false-promotion rate of the sequential test: 200 seeded simulations of two equal arms (20 %
   low-score rate), 20 looks each, along the default ramp (must be ≤ QE_AB_ALPHA = 5 %);
2. answers needed to decide for a 20 % relative improvement (20 % → 16 %), along the ramp and at
   a fixed 50 / 50 split;
3. the request path: `capture` p50/p99 with model counting against without, on the file inbox
   and on Redis (a redis-server started here on a free loopback port).

`python -m qe_assets_bench.rollout [--simulations 200] [--captures 5000] [--flush-seconds 5]`.
"""

from __future__ import annotations

import argparse
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qe_assets.rollout.sequential import CONTINUE, PROMOTE, ROLLBACK, Arms, Policy, decide


@dataclass(frozen=True)
class Outcome:
    decision: str  # promote | rollback | continue (no decision within the looks)
    looks: int
    answers: int  # both arms, when decided (or at the end)
    answers_candidate: int


def simulate(
    rate_production: float,
    rate_candidate: float,
    seed: int,
    policy: Policy,
    *,
    answers_per_look: int = 2_000,
    looks: int = 20,
    fixed_share: float | None = None,
) -> Outcome:
    """One A/B test as `ab_test` runs it: each look adds `answers_per_look` answers split by the
    current share, then `decide` (the asset's own rule) says promote, rollback or continue."""
    rng = np.random.default_rng(seed)
    share = fixed_share if fixed_share is not None else policy.ramp[0]
    at_share = 0
    n_p = low_p = n_c = low_c = 0
    for look in range(1, looks + 1):
        to_candidate = int(rng.binomial(answers_per_look, share))
        to_production = answers_per_look - to_candidate
        n_p += to_production
        low_p += int(rng.binomial(to_production, rate_production))
        n_c += to_candidate
        low_c += int(rng.binomial(to_candidate, rate_candidate))
        decision = decide(Arms(n_p, low_p, n_c, low_c), share, at_share, policy)
        if decision.decision != CONTINUE:
            return Outcome(decision.decision, look, n_p + n_c, n_c)
        if fixed_share is None and decision.share != share:
            share, at_share = decision.share, n_c
    return Outcome(CONTINUE, looks, n_p + n_c, n_c)


def false_promotions(policy: Policy, simulations: int, looks: int = 20) -> dict[str, float]:
    outcomes = [simulate(0.2, 0.2, seed, policy, looks=looks) for seed in range(simulations)]
    return {
        "false_promotion_rate": sum(o.decision == PROMOTE for o in outcomes) / simulations,
        "false_rollback_rate": sum(o.decision == ROLLBACK for o in outcomes) / simulations,
    }


def answers_to_decide(
    policy: Policy, simulations: int, fixed_share: float | None
) -> dict[str, float]:
    outcomes = [
        simulate(0.2, 0.16, seed, policy, looks=500, answers_per_look=500, fixed_share=fixed_share)
        for seed in range(simulations)
    ]
    promoted = [o for o in outcomes if o.decision == PROMOTE]
    answers = sorted(o.answers for o in promoted)
    candidate = sorted(o.answers_candidate for o in promoted)
    return {
        "power": len(promoted) / simulations,
        "answers_median": statistics.median(answers) if answers else float("nan"),
        "answers_p90": answers[int(0.9 * (len(answers) - 1))] if answers else float("nan"),
        "candidate_answers_median": statistics.median(candidate) if candidate else float("nan"),
    }


def _event(i: int, score: float) -> dict:
    return {
        "request_id": f"bench-{i}",
        "question": "How many days do I have to request a refund?",
        "docs": [{"id": "kb-1", "content": "Refunds are accepted within 30 days."}],
        "answer": "You have 14 days.",
        "evaluation": {"score": score, "labels": ["factuality_error"]},
    }


def capture_latency(
    settings_kwargs: dict, captures: int, flush_seconds: float, root: Path
) -> dict[bool, dict[str, float]]:
    """Latency (ms) of `capture` calls without (False) and with (True) `model=` counting, the
    two interleaved call by call in one process so that both see the same load on a shared
    machine. A fifth of the calls are low-score (captured), the rest skipped. Per side: p99 of
    all calls, p99 of the captured ones, mean of the skipped ones (counting is all the work
    those do)."""
    from qe_assets.service.capture import QualityCapture
    from qe_assets.settings import Settings

    def make(side: str) -> QualityCapture:
        data = root / side
        return QualityCapture(
            Settings(data_dir=str(data), count_flush_seconds=flush_seconds, **settings_kwargs)
        )

    captures_by_side = {False: make("plain"), True: make("counted")}
    rng = random.Random(7)
    times: dict[bool, tuple[list[float], list[float]]] = {False: ([], []), True: ([], [])}
    for i in range(2 * captures):
        with_model = bool(i % 2)
        low = rng.random() < 0.2
        extra = {"model": "m-candidate" if i % 4 == 1 else "m-production"} if with_model else {}
        event = {**_event(i, 0.3 if low else 0.9), **extra}
        started = time.perf_counter()
        captures_by_side[with_model].capture_event(event)
        times[with_model][0 if low else 1].append((time.perf_counter() - started) * 1000)
    captures_by_side[True].counter.close()
    result = {}
    for side, (captured, skipped) in times.items():
        every = sorted(captured + skipped)
        captured.sort()
        result[side] = {
            "p99_ms": every[int(0.99 * (len(every) - 1))],
            "captured_p99_ms": captured[int(0.99 * (len(captured) - 1))],
            "skipped_mean_ms": statistics.fmean(skipped),
        }
    return result


def counting_cost(calls: int = 100_000, repeats: int = 5) -> float:
    """Microseconds counting adds to one `capture` call: skipped (high-score) calls with and
    without `model=`, best of `repeats` loops of `calls`; the best run is the least disturbed
    by other work on the machine, so this holds where p99s are noise."""
    from qe_assets.service.capture import QualityCapture
    from qe_assets.settings import Settings

    def best(capture: QualityCapture, extra: dict) -> float:
        event = {**_event(0, 0.9), **extra}
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(calls):
                capture.capture_event(event)
            runs.append((time.perf_counter() - started) / calls * 1e6)
        return min(runs)

    with tempfile.TemporaryDirectory(prefix="qe-bench-rollout-") as tmp:
        capture = QualityCapture(Settings(data_dir=tmp, count_flush_seconds=5.0))
        plain = best(capture, {})
        counted = best(capture, {"model": "m"})
        capture.counter.close()
    return counted - plain


def _redis_server(workdir: Path) -> tuple[subprocess.Popen[bytes], str] | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port)
    for _ in range(500):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.01)
    return process, f"redis://127.0.0.1:{port}/0"


def capture_overhead(
    captures: int, flush_seconds: float, rounds: int = 5
) -> list[tuple[str, dict, dict]]:
    """(queue, without counting, with counting) for the inbox and Redis: the median over
    `rounds` of each figure."""
    results = []
    with tempfile.TemporaryDirectory(prefix="qe-bench-rollout-") as tmp:
        server = _redis_server(Path(tmp))
        queues: list[tuple[str, dict]] = [("inbox", {})]
        if server is not None:
            queues.append(("redis", {"queue_url": server[1]}))
        try:
            for name, extra in queues:
                runs = [
                    capture_latency(extra, captures, flush_seconds, Path(tmp) / f"{name}-{r}")
                    for r in range(rounds)
                ]

                def median(side: bool, runs: list = runs) -> dict[str, float]:
                    return {
                        k: statistics.median(run[side][k] for run in runs) for k in runs[0][side]
                    }

                results.append((name, median(False), median(True)))
        finally:
            if server is not None:
                server[0].terminate()
                server[0].wait()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulations", type=int, default=200)
    parser.add_argument("--captures", type=int, default=5_000)
    parser.add_argument(
        "--flush-seconds", type=float, default=5.0, help="QE_COUNT_FLUSH_SECONDS while measuring"
    )
    args = parser.parse_args()
    policy = Policy()
    print(f"A/B rollout, default policy: {policy}")
    started = time.perf_counter()
    rates = false_promotions(policy, args.simulations)
    print(
        f"equal arms (20 % vs 20 %), {args.simulations} simulations x 20 looks of 2,000 "
        f"answers: false-promotion rate {rates['false_promotion_rate']:.1%} "
        f"(bound {policy.alpha:.0%}), rollback of an equal candidate "
        f"{rates['false_rollback_rate']:.1%}"
    )
    for label, share in (("ramp 5 % → 25 % → 50 %", None), ("fixed 50 / 50", 0.5)):
        need = answers_to_decide(policy, args.simulations, share)
        print(
            f"20 % → 16 % low-score rate, {label}, looks every 500 answers: promoted in "
            f"{need['power']:.0%} of runs; answers (both arms) median "
            f"{need['answers_median']:,.0f}, p90 {need['answers_p90']:,.0f}; candidate's "
            f"answers median {need['candidate_answers_median']:,.0f}"
        )
    print(f"(simulations took {time.perf_counter() - started:.1f} s)")
    cost = counting_cost()
    print(f"counting adds {cost:.2f} µs to a capture call (best of 5 x 100,000 skipped calls)")
    for name, without, counted in capture_overhead(args.captures, args.flush_seconds):
        ratio = counted["p99_ms"] / without["p99_ms"] - 1
        captured = counted["captured_p99_ms"] / without["captured_p99_ms"] - 1
        print(
            f"capture on {name}, {args.captures:,} calls (20 % captured), flush every "
            f"{args.flush_seconds:g} s, interleaved, median of 5 rounds, without → with "
            f"counting: p99 {without['p99_ms']:.3f} → {counted['p99_ms']:.3f} ms ({ratio:+.1%}); "
            f"captured calls p99 {without['captured_p99_ms']:.3f} → "
            f"{counted['captured_p99_ms']:.3f} ms ({captured:+.1%}); skipped calls mean "
            f"{without['skipped_mean_ms'] * 1000:.1f} → "
            f"{counted['skipped_mean_ms'] * 1000:.1f} µs; the counting cost is "
            f"{cost / 1000 / without['p99_ms']:.3%} of that p99"
        )


if __name__ == "__main__":
    main()
