"""The language: source positions, syntax tree, parser and printer."""
