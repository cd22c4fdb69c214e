"""Selection methods behind one interface, one module each.

A method is a callable ``select(ctx: MethodContext) -> Selection`` in module
``cahp_deploy.methods.<module>``. The registry maps the ``--method`` name to that module, imported only
when used (the trainable baselines pull in more code than ``random`` needs). Adding a method is one
module plus one line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from cahp_deploy.errors import CahpError

if TYPE_CHECKING:
    from cahp_deploy.methods.base import Method, MethodContext

#: --method name -> (module, whether it needs a budget)
REGISTRY: dict[str, tuple[str, bool]] = {
    "cahp": ("cahp_deploy.methods.cahp", False),
    "gradient": ("cahp_deploy.methods.gradient", True),
    "random": ("cahp_deploy.methods.random_heads", True),
    "attattr": ("cahp_deploy.methods.attattr", True),
    "l0": ("cahp_deploy.methods.l0", False),
    "dsp": ("cahp_deploy.methods.dsp", True),
    "pass": ("cahp_deploy.methods.pass_gates", True),
}


def get_method(name: str) -> Method:
    try:
        module, _ = REGISTRY[name]
    except KeyError:
        raise CahpError(f"unknown method {name!r}; choose from {', '.join(REGISTRY)}") from None
    return importlib.import_module(module).select


def needs_budget(name: str) -> bool:
    return REGISTRY[name][1]


def __getattr__(name: str):
    if name in ("Method", "MethodContext"):  # on first use: the registry and the config need no torch
        from cahp_deploy.methods import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["REGISTRY", "Method", "MethodContext", "get_method", "needs_budget"]
