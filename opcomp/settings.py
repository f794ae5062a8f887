"""The optimizer's settings that are not the expression, checked before anything is built."""

from __future__ import annotations

from opcomp.errors import OpcompError


def check_settings(compile: str, reduction: str, likelihood: str | None, class_dim: int | None) -> int:  # noqa: A002
    """Refuse a setting outside its values, naming it; returns the class dimension to use:
    classes on dim 1, as F.cross_entropy reads (N, C, …), a Gaussian's features last."""
    if compile not in ("auto", "on", "off"):
        raise OpcompError(f"compile must be 'auto', 'on' or 'off', got {compile!r}")
    if reduction not in ("mean", "sum"):
        raise OpcompError(f"reduction must be 'mean' or 'sum' (how the loss combines examples), got {reduction!r}")
    if likelihood not in (None, "categorical", "gaussian"):
        raise OpcompError(f"likelihood must be 'categorical' or 'gaussian', got {likelihood!r}")
    if class_dim is not None and (isinstance(class_dim, bool) or not isinstance(class_dim, int) or class_dim == 0):
        raise OpcompError(f"class_dim is a dimension of the model's output other than the batch's 0, got {class_dim!r}")
    if class_dim is not None:
        return class_dim
    return 1 if likelihood == "categorical" else -1
