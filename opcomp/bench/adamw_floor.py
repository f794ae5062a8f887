"""What the exact inf/NaN check costs a compiled AdamW step, beside torch's fused AdamW, which has none.

    python -m opcomp.bench.adamw_floor [--shapes small|gpt2|resnet18] [--steps 30] [--device cpu]

Five rows over the same shapes, interleaved round by round with the order alternating:

- torch's fused AdamW, which applies whatever the gradients hold;
- AdamW written by hand and compiled, without a check: what inductor's kernels reach;
- the same with the check opcomp's compiled steps make (one ``isfinite().all()`` reduction per
  gradient, and a ``where(ok, new, old)`` in the update), the least a step can cost that keeps
  "a non-finite gradient applies nothing";
- the same with the two-sided ``aminmax`` reduction they made before;
- opcomp's ``adamw(g)``: torch's fused kernel, told by opcomp's check whether to apply
  (``opcomp.step.fused``), the same with any ``compile`` setting.

The hand-written steps take their bias corrections as fixed 0-d tensors: they time the kernels,
not a training run.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from torch import Tensor

import opcomp
from opcomp.bench.step import SHAPES, interleaved, parameters, stepper
from opcomp.finite import flag as finite_flag


def unchecked(ps: list[Tensor], gs, ms, vs, lr: Tensor, c1: Tensor, c2: Tensor) -> None:
    """AdamW (b1 0.9, b2 0.999, eps 1e-8, decay 0.01) in place, in torch.optim's op order."""
    for p, g, m, v in zip(ps, gs, ms, vs):
        m.lerp_(g, 0.1)
        v.mul_(0.999).addcmul_(g, g, value=0.001)
        p.mul_(1 - lr * 0.01).sub_(lr * (m / c1) / ((v / c2).sqrt() + 1e-8))


def checked(ps: list[Tensor], gs, ms, vs, lr: Tensor, c1: Tensor, c2: Tensor, flag: Callable = finite_flag) -> None:
    """:func:`unchecked` that changes nothing unless every gradient is finite (``flag`` says)."""
    ok = flag(gs)
    for p, g, m, v in zip(ps, gs, ms, vs):
        m_new = m.lerp(g, 0.1)
        v_new = v.mul(0.999).addcmul_(g, g, value=0.001)
        p_new = p.mul(1 - lr * 0.01).sub_(lr * (m_new / c1) / ((v_new / c2).sqrt() + 1e-8))
        for tensor, new in ((p, p_new), (m, m_new), (v, v_new)):
            tensor.copy_(torch.where(ok, new, tensor))


def checked_by_ends(ps: list[Tensor], gs, ms, vs, lr: Tensor, c1: Tensor, c2: Tensor) -> None:
    """:func:`checked` with the check opcomp's compiled steps made before: each gradient's minimum
    and maximum (``aminmax``), finite exactly when all its elements are."""
    checked(ps, gs, ms, vs, lr, c1, c2, flag=ends_finite)


def ends_finite(tensors: list[Tensor]) -> Tensor:
    return torch.cat([torch.stack(torch.aminmax(t)) for t in tensors]).isfinite().all()


def by_hand(step: Callable, shapes, device: str) -> Callable[[], None]:
    """``step`` compiled, over its own parameters, gradients and moments."""
    params = parameters(shapes, device)
    tensors = [[p.detach() for p in params], [p.grad for p in params]]
    tensors += [[torch.zeros_like(p) for p in params] for _ in range(2)]
    scalars = [torch.tensor(value, device=device) for value in (1e-3, 0.1, 0.001)]
    compiled = torch.compile(step)
    return lambda: compiled(*tensors, *scalars)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="small", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    shapes = SHAPES[args.shapes]()
    fused = torch.optim.AdamW(parameters(shapes, args.device), lr=1e-3, fused=True)
    ours = opcomp.build("adamw(g)", parameters(shapes, args.device), lr=1e-3)
    rows = {
        "torch AdamW fused (no check)": stepper(fused),
        "AdamW by hand, compiled, no check": by_hand(unchecked, shapes, args.device),
        "AdamW by hand, compiled, exact check (isfinite, as opcomp's compiled steps)": by_hand(
            checked, shapes, args.device
        ),
        "AdamW by hand, compiled, exact check (aminmax)": by_hand(checked_by_ends, shapes, args.device),
        "opcomp adamw(g)": stepper(ours),
    }
    for step in rows.values():
        step()
        step()
    samples = interleaved(rows, args.steps, args.device, alternate=True)
    times = {name: statistics.median(values) * 1e3 for name, values in samples.items()}
    total = sum(torch.Size(s).numel() for s in shapes)
    print(
        f"{args.shapes}: {total / 1e6:.1f}M parameters in {len(shapes)} tensors, device {args.device}, "
        f"{torch.get_num_threads()} threads, median of {args.steps} interleaved steps"
    )
    print()
    print("| step | ms | × fused AdamW |")
    print("| --- | --- | --- |")
    fused_ms = times["torch AdamW fused (no check)"]
    for name, ms in times.items():
        print(f"| {name} | {ms:.2f} | {ms / fused_ms:.2f} |")


if __name__ == "__main__":
    main()
