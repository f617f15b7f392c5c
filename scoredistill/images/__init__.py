"""Image teachers for scoredistill: diffusers adapters, the embedded ``digits`` default, image metrics.

The plugin (:mod:`scoredistill.images.plugin`, registered as the core plugin ``images``)
provides:

* teachers in the one sigma convention (Karras et al. 2022, ``x_s = x + s * eps``): any diffusers ``UNet2DModel``,
  ``UNet2DConditionModel``, ``DiTTransformer2DModel``, ``SD3Transformer2DModel`` or
  ``FluxTransformer2DModel`` (:mod:`scoredistill.images.backbones`) with its scheduler config
  (DDPM / DDIM / Euler and other discrete VP schedules with ``epsilon``, ``v_prediction`` or
  ``sample`` prediction; EDM schedulers for a natively EDM-preconditioned network;
  FlowMatchEuler schedulers for flow matching), with classifier-free guidance on the real
  score (:mod:`scoredistill.images.denoisers`); ``--teacher FOLDER`` picks it from a folder;
* ``digits`` and ``digits_flow``: scikit-learn's bundled handwritten digits and a small
  teacher (EDM or rectified flow) that the project trains itself and caches (:mod:`scoredistill.images.data`,
  :mod:`scoredistill.images.training`);
* generator and fake score initialised from the teacher (:mod:`scoredistill.images.networks`);
* ODE pairs in resumable safetensors shards (:mod:`scoredistill.images.pairs`);
* FID through clean-fid with Inception (where cached) and with a digits classifier,
  class histograms and sample grids (:mod:`scoredistill.images.metrics`,
  :mod:`scoredistill.images.plots`);
* the commands ``scoredistill teacher train`` and ``scoredistill eval``.
"""
