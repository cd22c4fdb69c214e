"""Torch code that only *collects* statistics from a classifier: attention signatures and salience.

Nothing here decides which heads to keep; that is :mod:`cahp_deploy.selection` (pure numpy).
"""

from __future__ import annotations

from cahp_deploy.hf_classifier import model_inputs

__all__ = ["model_inputs"]
