"""The ``opcomp`` command."""

from __future__ import annotations

import argparse
import sys

from opcomp.definitions import Namespace, presets
from opcomp.errors import OpcompError
from opcomp.files import call, load_callable, read_text


def _namespace(paths: list[str]) -> Namespace:
    namespace = presets()
    for path in paths:
        namespace = namespace.load(read_text(path, "--defs"), path)
    return namespace


def _explain(args: argparse.Namespace) -> str:
    from opcomp import lower
    from opcomp.explain import explain

    if args.model is not None:
        import opcomp

        opt = opcomp.build(args.expr, _model(args.model), namespace=_namespace(args.defs))
        return opt.explain()
    return explain(lower(args.expr, _namespace(args.defs)), args.expr)


def _model(spec: str):
    """MODULE:FACTORY -> the model the factory returns (e.g. opcomp.comparison.models:cnn)."""
    import torch

    model = call(f"{spec}()", "--model", load_callable(spec, "--model"))
    if not isinstance(model, torch.nn.Module):
        raise OpcompError(f"--model: {spec}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _format(args: argparse.Namespace) -> str:
    from opcomp import format as canonical

    return canonical(args.expr, _namespace(args.defs))


def _operators(args: argparse.Namespace) -> str:
    from opcomp.catalogue import catalogue_markdown
    from opcomp.kernels import load
    from opcomp.ops import REGISTRY

    if args.markdown:
        return catalogue_markdown({name: kernel.__module__ for name, kernel in load().items()}).rstrip("\n")
    return "\n".join(f"{s.name:<13} {s.kind.value:<12} {s.summary}" for s in REGISTRY if s.callable)


def _presets(args: argparse.Namespace) -> str:
    from opcomp.comparison.footprint import preset_table

    return preset_table()


def _compare(rest: list[str]) -> str:
    from opcomp.comparison import runs as compare

    return compare.main(rest)


def _bench(rest: list[str]) -> str:
    from opcomp.bench import step

    if rest[:1] != ["step"]:
        raise OpcompError("opcomp bench has one benchmark: opcomp bench step [--shapes ...] (see --help)")
    step.main(rest[1:])
    return ""


DELEGATED = {"compare": _compare, "bench": _bench}
"""Subcommands that parse their own arguments."""


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="opcomp", description="Optimizers written as expressions over preconditioning operators."
    )
    commands = root.add_subparsers(dest="command", required=True)

    explain = commands.add_parser("explain", help="show the graph of an expression and what it needs")
    explain.add_argument("expr", help='an expression, a preset, or a rule file, e.g. "muon(kfac(g))"')
    explain.add_argument("--defs", action="append", default=[], metavar="FILE", help="a .opc file of definitions")
    explain.add_argument(
        "--model", metavar="MODULE:FACTORY", help="build on this model and show what each parameter runs"
    )
    explain.set_defaults(run=_explain)

    fmt = commands.add_parser("format", help="print an expression in canonical form")
    fmt.add_argument("expr")
    fmt.add_argument("--defs", action="append", default=[], metavar="FILE")
    fmt.set_defaults(run=_format)

    operators = commands.add_parser("operators", help="list the operators")
    operators.add_argument("--markdown", action="store_true", help="the full catalogue (docs/operators.md)")
    operators.set_defaults(run=_operators)

    listing = commands.add_parser(
        "presets", help="list the presets: definition, recommended lr, passes per step, state bytes per parameter"
    )
    listing.set_defaults(run=_presets)

    commands.add_parser("compare", help="train optimizers side by side on real data: opcomp compare --help")
    commands.add_parser("bench", help="step time and memory against torch.optim: opcomp bench step --help")
    return root


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    delegated = DELEGATED.get(argv[0]) if argv else None
    args = None if delegated else parser().parse_args(argv)
    try:
        output = delegated(argv[1:]) if delegated else args.run(args)
        if output:
            print(output)
    except OpcompError as error:
        print(f"opcomp: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"opcomp: cannot read {error.filename}: {error.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
