"""scoredistill-example: a third-party plugin for scoredistill.

It adds one component, the generator loss ``example_sid_fisher`` (Score identity
Distillation, a Fisher divergence), and one method, ``example_sid``, that combines
it with parts of the DMD plugin it reuses by name. The documentation's tutorial
walks through every file of this package.
"""

__version__ = "0.1.0"
