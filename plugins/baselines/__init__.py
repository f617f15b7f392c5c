"""Baseline methods DMD is measured against, composed from registered components.

Installed as the import package ``scoredistill_baselines`` and registered through
the ``scoredistill`` entry-point group.
"""
