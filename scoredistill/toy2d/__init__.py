"""The toy 2-D problem for scoredistill: an exact Gaussian-mixture teacher, MLP networks, exact metrics.

The plugin (:mod:`scoredistill.toy2d.plugin`, entry point ``toy2d``) provides:

* the ``gaussian_mixture`` teacher: the exact denoiser of a noised isotropic Gaussian
  mixture (:mod:`scoredistill.toy2d.gaussian_mixture`), a teacher with known ground truth;
* ``mlp_generator`` and ``mlp_denoiser`` (:mod:`scoredistill.toy2d.networks`);
* the preset ``toy2d``;
* exact metrics of a run's samples against the mixture (:mod:`scoredistill.toy2d.toy_metrics`)
  and scatter pictures over the mixture's density (:mod:`scoredistill.toy2d.plots`).
"""
