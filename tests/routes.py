"""Forcing a CPU route of linear_relu or conv2d (LIGHTNING_HW_ROUTE, csrc/cpu/route_choice.h) in a test."""

from __future__ import annotations

import contextlib
import os

# "rule": the built-in rule, no timing; the others run wherever they can run the shape.
LINEAR_ROUTES = ("rule", "streamed", "tiles", "blas")
# conv2d's, for its forward, input gradient and weight gradient alike ("aten": torch's own convolution).
CONV_ROUTES = ("rule", "direct", "planar", "depthwise", "aten")


@contextlib.contextmanager
def forced_route(route: str):
    """Run the block with the CPU routes forced ("rule": timing off)."""
    names = ("LIGHTNING_HW_ROUTE", "LIGHTNING_HW_AUTOTUNE")
    saved = {name: os.environ.get(name) for name in names}
    if route == "rule":
        os.environ.pop("LIGHTNING_HW_ROUTE", None)
        os.environ["LIGHTNING_HW_AUTOTUNE"] = "0"
    else:
        os.environ["LIGHTNING_HW_ROUTE"] = route
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
