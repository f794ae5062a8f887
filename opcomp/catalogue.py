"""The operator catalogue (docs/operators.md), generated from the registry.

Regenerate with ``opcomp operators --markdown > docs/operators.md``; a test keeps the file in step.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping

from opcomp.explain import APPLIES_TEXT, value_text
from opcomp.ops import REGISTRY, Applies, Kind, OpSpec
from opcomp.ops.registry import bounds, enum_values

_SYMBOLS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def type_text(field) -> str:
    """The option's type and bounds, e.g. ``float, >=0.0, <1.0`` or ``plain | adaptive | fisher``."""
    words = enum_values(field.annotation)
    if words:
        return " \\| ".join(words)
    annotation = field.annotation
    name = getattr(annotation, "__name__", None) or str(annotation)
    if typing.get_origin(annotation) is tuple:
        name = "signs"
    limits = [f"{_SYMBOLS[key]} {value}" for key, value in bounds(field).items()]
    return ", ".join([name, *limits])


def _usage(spec: OpSpec) -> str:
    if spec.symbol == "*":
        return "`c * x`"
    if spec.symbol:
        return f"`a {spec.symbol} b {spec.symbol} …`"
    args = f"({', '.join(spec.params)})" if spec.params else ""
    opts = "[…]" if spec.option_fields() else ""
    return f"`{spec.name}{opts}{args}`"


def spec_file(spec: OpSpec) -> str:
    """The module that registers ``spec``: its family's, ``ops/<kind>.py`` (``combinators`` plural)."""
    return f"opcomp/ops/{'combinators' if spec.kind is Kind.COMBINATOR else spec.kind.value}.py"


def operator_section(spec: OpSpec, kernel: str | None = None) -> list[str]:
    """``kernel``: the module of the operator's kernel (``opcomp.kernels.elementwise``), if it has one."""
    lines = [f"### `{spec.name}`", "", f"{spec.summary[0].upper()}{spec.summary[1:]}.", ""]
    lines.append(f"- usage: {_usage(spec)}")
    where = f"spec in `{spec_file(spec)}`"
    if kernel is not None:
        where += f", kernel in `{kernel.replace('.', '/')}.py`"
    lines.append(f"- code: {where}")
    if spec.aliases:
        lines.append("- aliases: " + ", ".join(f"`{a}`" for a in spec.aliases))
    lines.append(f"- meaning: {spec.formula}")
    if spec.applies is not Applies.ANY:
        lines.append(f"- applies to: {APPLIES_TEXT[spec.applies]}; elsewhere use a fallback `| adamw(g)` or a rule")
    needs = spec.needs.describe()
    if spec.cost_when is not None and "fisher" in spec.option_fields():
        needs.append("with fisher=mc, a likelihood at build (opcomp.build(..., likelihood=...))")
    if needs:
        lines.append("- needs: " + "; ".join(needs))
    if spec.binds_gradient:
        lines.append("- inside its argument, `g` is the probed gradient")
    for buffer in spec.state:
        lines.append(f"- state `{buffer.name}` ({buffer.shape}): {buffer.doc}")
    fields = spec.option_fields()
    if fields and spec.callable:
        lines += ["", "| option | type | default | meaning |", "| --- | --- | --- | --- |"]
        for name, field in fields.items():
            default = value_text(field.default)
            lines.append(f"| `{name}` | {type_text(field)} | `{default}` | {field.description or ''} |")
    lines.append("")
    return lines


def catalogue_markdown(kernels: Mapping[str, str]) -> str:
    """The catalogue; ``kernels``: operator -> the module of its kernel (``opcomp.kernels.KERNELS``'s)."""
    lines = [
        "# Operator catalogue",
        "",
        "Generated from the registry by `opcomp operators --markdown`; do not edit by hand.",
        "A bare name is the operator applied to `g` (`adamw` is `adamw(g)`); a bare option is a flag",
        "(`sam[fisher]` is `sam[mode=fisher]`). Options are strictly typed and bounded as listed.",
        "",
    ]
    for kind in Kind:
        specs = [s for s in REGISTRY if s.kind is kind]
        lines += [f"## {kind.value}", ""]
        for spec in specs:
            lines += operator_section(spec, kernels.get(spec.name))
    return "\n".join(lines).rstrip() + "\n"
