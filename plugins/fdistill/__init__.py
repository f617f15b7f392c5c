"""f-distill: DMD2's distribution-matching gradient weighted by an f-divergence's density-ratio term.

Installed as the import package ``scoredistill_fdistill`` and registered through the
``scoredistill`` entry-point group, exactly as a third-party plugin would be.
"""
