"""Distil diffusion models into one-step generators by score distillation."""

__version__ = "0.1.0"

from scoredistill.hookspecs import hookimpl, hookspec

__all__ = ["hookimpl", "hookspec", "__version__"]
