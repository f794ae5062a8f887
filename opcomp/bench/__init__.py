"""Benchmarks: scripts that measure, never tests that assert timings."""


def table_cell(text: str) -> str:
    """``text`` inside a markdown table cell: the bars of a fallback (``a | b``) escaped."""
    return text.replace("|", "\\|")
