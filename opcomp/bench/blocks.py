"""Block-KFAC's memory and cost at GPT-2 small's output head: G of 50,257 × 50,257 whole, in blocks, or diagonal.

    python -m opcomp.bench.blocks [--tokens 512] [--blocks 1,256,1024,4096] [--device cpu]

One ``kfac[block=k]`` optimizer on a Linear(768 → 50,257) (GPT-2 small's head, no bias) per block
size: the bytes its state keeps for the head (A, G and their inverses; A, 768 wide, is blocked too
where k < 768), the time of its first step (statistics and the inverses' refresh) and of its
second (statistics and preconditioning only).
The whole factor is not run: its size is computed (two 50,257² fp32 matrices, G and its inverse).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import opcomp
from opcomp.layers.shapes import FactorForm
from opcomp.report import readable_bytes

VOCABULARY, HIDDEN = 50_257, 768


def timed_step(model: nn.Module, opt: opcomp.Optimizer, tokens: torch.Tensor, device: str) -> float:
    """Seconds of one forward, backward and step (the device synchronised around it)."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    opt.zero_grad()
    model(tokens).square().mean().backward()
    opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--blocks", default="1,256,1024,4096")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    print(f"Linear({HIDDEN} → {VOCABULARY}), {args.tokens} tokens, {torch.get_num_threads()} threads, {args.device}")
    print()
    columns = (
        "kfac[block=k]",
        "A (768) kept as",
        "G (50,257) kept as",
        "state of the head",
        "first step s",
        "second step s",
    )
    print("| " + " | ".join(columns) + " |")
    print("| --- | --- | --- | --- | --- | --- |")
    whole = 2 * FactorForm(VOCABULARY).nbytes() + 2 * FactorForm(HIDDEN).nbytes()
    print(f"| none (computed, not run) | whole | whole | {readable_bytes(whole)} | — | — |")
    inputs = torch.randn(args.tokens, HIDDEN, device=args.device)
    for block in (int(b) for b in args.blocks.split(",")):
        torch.manual_seed(0)
        model = nn.Linear(HIDDEN, VOCABULARY, bias=False, device=args.device)
        written = f"kfac[block={block}, max_dim=100000, invert_every=10](g)"
        opt = opcomp.build(written, model, lr=1e-3)
        first = timed_step(model, opt, inputs, args.device)
        second = timed_step(model, opt, inputs, args.device)
        kept = sum(
            t.numel() * t.element_size()
            for v in opt.state[model.weight].values()
            if isinstance(v, dict)
            for t in v.values()
            if isinstance(t, torch.Tensor) and t.ndim > 0
        )
        a_form, g_form = FactorForm.within(HIDDEN, block), FactorForm.within(VOCABULARY, block)
        row = (str(block), a_form.describe(), g_form.describe(), readable_bytes(kept), f"{first:.2f}", f"{second:.2f}")
        print("| " + " | ".join(row) + " |")
        del model, opt


if __name__ == "__main__":
    main()
