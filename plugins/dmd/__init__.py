"""The DMD plugin: Distribution Matching Distillation (Yin et al., CVPR 2024) as components.

Installed as the import package ``scoredistill_dmd`` and registered through the
``scoredistill`` entry-point group, exactly as a third-party plugin would be.
"""
