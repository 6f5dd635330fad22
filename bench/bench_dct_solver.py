"""DCT's exact solver against graph size, and against brute-force enumeration.

    .venv/bin/python bench/bench_dct_solver.py [--seed 0] [--max-brute 20]
Graphs are DCT-shaped: node 0 is the seed, implying about half the other nodes and contradicting
the rest, plus n // 3 random contradictions among the others; P(true) uniform. Prints, per size,
the median solve time over 5 graphs, the search nodes visited, and one brute-force enumeration
(sizes up to --max-brute) with whether the two optima agree. Target: 20 nodes in under a second.
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import time

from closedloop.methods.dct_solver import CONTRADICTS, IMPLIES, log_prob, solve, violations


def dct_graph(n: int, rng: random.Random) -> tuple[list[float], list[tuple[int, int, str]]]:
    p = [rng.random() for _ in range(n)]
    edges = [(0, i, IMPLIES if rng.random() < 0.5 else CONTRADICTS) for i in range(1, n)]
    extra = [(rng.randrange(1, n), rng.randrange(1, n), CONTRADICTS) for _ in range(n // 3)] if n > 2 else []
    return p, edges + [e for e in extra if e[0] != e[1]]


def brute_force(p: list[float], edges: list) -> float:
    return max(log_prob(p, labels) for labels in itertools.product([True, False], repeat=len(p))
               if not violations(labels, edges))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-brute", type=int, default=20)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    print(f"{'nodes':>5} {'edges':>5} {'solve ms (median of 5)':>22} {'explored':>8} {'brute force s':>13} {'agree':>5}")
    for n in (5, 8, 11, 14, 17, 20, 24, 28):
        graphs = [dct_graph(n, rng) for _ in range(5)]
        times, explored = [], []
        for p, edges in graphs:
            start = time.perf_counter()
            sol = solve(p, edges)
            times.append(time.perf_counter() - start)
            explored.append(sol.nodes_explored)
        brute, agree = "-", "-"
        if n <= args.max_brute:
            p, edges = graphs[0]
            start = time.perf_counter()
            best = brute_force(p, edges)
            brute = f"{time.perf_counter() - start:.2f}"
            agree = "yes" if abs(best - solve(p, edges).log_prob) <= 1e-9 else "NO"
        print(f"{n:>5} {len(graphs[0][1]):>5} {1000 * statistics.median(times):>22.2f} "
              f"{statistics.median(explored):>8.0f} {brute:>13} {agree:>5}")


if __name__ == "__main__":
    main()
