"""cahp-deploy: prune attention heads with CAHP and ship the result as a verified ONNX artifact.

Stages (each a CLI command and a function of the same name):
select -> selection.json -> prune -> pruned model dir -> export -> artifact dir -> bench -> report dir.
"""

from __future__ import annotations

__version__ = "0.1.0"


def load_pruned(path, **kwargs):
    """Rebuild a model written by ``cahp-deploy prune`` (see :mod:`cahp_deploy.pruning`)."""
    from cahp_deploy.pruning import load_pruned as _load

    return _load(path, **kwargs)


__all__ = ["__version__", "load_pruned"]
