"""Latent Adversarial Diffusion Distillation (LADD) as components: a discriminator on a frozen teacher's features.

Installed as the import package ``scoredistill_ladd`` and registered through the
``scoredistill`` entry-point group, exactly as a third-party plugin would be.
"""
