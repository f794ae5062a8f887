"""The ``opcomp`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opcomp.definitions import Namespace, presets
from opcomp.errors import OpcompError


def _namespace(paths: list[str]) -> Namespace:
    namespace = presets()
    for path in paths:
        namespace = namespace.load(Path(path).read_text(encoding="utf-8"), path)
    return namespace


def _explain(args: argparse.Namespace) -> str:
    from opcomp import lower
    from opcomp.explain import explain

    return explain(lower(args.expr, _namespace(args.defs)), args.expr)


def _format(args: argparse.Namespace) -> str:
    from opcomp import format as canonical

    return canonical(args.expr, _namespace(args.defs))


def _operators(args: argparse.Namespace) -> str:
    from opcomp.catalogue import catalogue_markdown
    from opcomp.ops import REGISTRY

    if args.markdown:
        return catalogue_markdown().rstrip("\n")
    return "\n".join(f"{s.name:<13} {s.kind.value:<12} {s.summary}" for s in REGISTRY if s.callable)


def _presets(args: argparse.Namespace) -> str:
    from opcomp.lang.printer import definition_source

    namespace = presets()
    return "\n".join(definition_source(namespace.get(name)) for name in namespace.names())


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="opcomp", description="Optimizers written as expressions over preconditioning operators."
    )
    commands = root.add_subparsers(dest="command", required=True)

    explain = commands.add_parser("explain", help="show the graph of an expression and what it needs")
    explain.add_argument("expr", help='an expression or preset, e.g. "muon(kfac(g))"')
    explain.add_argument("--defs", action="append", default=[], metavar="FILE", help="a .opc file of definitions")
    explain.set_defaults(run=_explain)

    fmt = commands.add_parser("format", help="print an expression in canonical form")
    fmt.add_argument("expr")
    fmt.add_argument("--defs", action="append", default=[], metavar="FILE")
    fmt.set_defaults(run=_format)

    operators = commands.add_parser("operators", help="list the operators")
    operators.add_argument("--markdown", action="store_true", help="the full catalogue (docs/operators.md)")
    operators.set_defaults(run=_operators)

    listing = commands.add_parser("presets", help="list the presets and their definitions")
    listing.set_defaults(run=_presets)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        print(args.run(args))
    except OpcompError as error:
        print(f"opcomp: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"opcomp: cannot read {error.filename}: {error.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
