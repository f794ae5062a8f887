"""Time parse + lower of a large expression.

    python -m opcomp.bench.parse [--nodes 200] [--repeat 50]

The expression is a sum of distinct terms, each a scaled chain over a shared Adam, so the graph
has at least ``--nodes`` nodes after sharing. Prints the median of each phase in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

from opcomp.graph import build_graph
from opcomp.lang.ast import children
from opcomp.lang.parser import parse
from opcomp.resolve import canonicalize

_TERMS = [
    "muon[beta=0.9{i}](adam(g))",
    "sign(momentum[beta=0.8{i}](g))",
    "orth[steps={s}](adam[b1=0.8{i}](g))",
    "reject(adam(g), ema[beta=0.5{i}](g))",
    "clip[max_norm={s}](rms[beta=0.9{i}](g))",
]


def expression(min_nodes: int) -> str:
    """A sum of distinct terms whose graph has at least ``min_nodes`` nodes."""
    terms: list[str] = []
    while True:
        i = len(terms)
        template = _TERMS[i % len(_TERMS)]
        terms.append(f"0.0{i + 1} * " + template.format(i=i, s=i + 1))
        text = " + ".join(terms)
        if len(build_graph(canonicalize(parse(text))).nodes) >= min_nodes:
            return text


def ast_size(expr) -> int:
    return 1 + sum(ast_size(c) for c in children(expr))


def median_ms(run, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--nodes", type=int, default=200)
    args.add_argument("--repeat", type=int, default=50)
    options = args.parse_args(argv)
    text = expression(options.nodes)
    tree = parse(text)
    canonical = canonicalize(tree)
    graph = build_graph(canonical)
    parse(text)  # warm the parser cache
    phases = {
        "parse": lambda: parse(text),
        "resolve": lambda: canonicalize(tree),
        "graph": lambda: build_graph(canonical),
        "parse + lower": lambda: build_graph(canonicalize(parse(text))),
    }
    print(f"expression: {len(text)} characters, {ast_size(tree)} syntax nodes, {len(graph.nodes)} graph nodes")
    print("| phase | median ms |")
    print("| --- | --- |")
    for name, run in phases.items():
        print(f"| {name} | {median_ms(run, options.repeat):.2f} |")


if __name__ == "__main__":
    main()
