"""Test settings: hypothesis example counts sized for a 2-core CI run, no deadlines (noisy machine)."""

import os
import sys

from hypothesis import HealthCheck, settings


def _hide_a_torchvision_that_cannot_load() -> None:
    """curvlinops (a test reference) installs torchvision through backpack, and its wheel is built
    for another torch: it fails at import, and transformers imports it whenever it is installed.
    The setup command uninstalls it (as CI does); where it is still there and fails, it is hidden
    from the whole session, before anything caches that it exists (``sys.modules['torchvision'] =
    None`` makes ``find_spec`` and imports see no package). That keeps transformers working, not
    Lightning, whose torchmetrics reads the installed metadata: there, uninstall it."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # RuntimeError: operator torchvision::nms does not exist
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None


_hide_a_torchvision_that_cannot_load()

settings.register_profile("default", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
