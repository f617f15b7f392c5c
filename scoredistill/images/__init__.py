"""Image teachers for scoredistill: diffusers adapters, the embedded ``digits`` default, image metrics.

The plugin (:mod:`scoredistill.images.plugin`, registered as the core plugin ``images``)
provides:

* teachers in the sigma convention (Karras et al. 2022, ``x_s = x + s * eps``, ``D(x_s, s) ~ E[x | x_s]``): any diffusers ``UNet2DModel`` or
  ``UNet2DConditionModel`` with its scheduler config (DDPM / DDIM / Euler and other
  discrete VP schedules with ``epsilon``, ``v_prediction`` or ``sample`` prediction;
  EDM schedulers for a natively EDM-preconditioned network), with classifier-free
  guidance on the real score (:mod:`scoredistill.images.denoisers`);
* ``digits``: scikit-learn's bundled handwritten digits and a small teacher that the
  project trains itself and caches (:mod:`scoredistill.images.data`,
  :mod:`scoredistill.images.training`);
* generator and fake score initialised from the teacher (:mod:`scoredistill.images.networks`);
* ODE pairs in resumable safetensors shards (:mod:`scoredistill.images.pairs`);
* FID through clean-fid with Inception (where cached) and with a digits classifier,
  class histograms and sample grids (:mod:`scoredistill.images.metrics`,
  :mod:`scoredistill.images.plots`);
* the commands ``scoredistill teacher train`` and ``scoredistill eval``.
"""
