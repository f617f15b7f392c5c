"""Score identity Distillation (SiD) and its adversarial extension (SiDA) as components.

Installed as the import package ``scoredistill_sid`` and registered through the
``scoredistill`` entry-point group, exactly as a third-party plugin would be.
"""
