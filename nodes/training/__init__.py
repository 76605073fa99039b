"""Training of the embedded ``tiny-shapes`` family on CPU: VAE, text encoder, then the DiT and the U-Net; and
their ControlNets.

Run ``python -m nodes.training --out nodes/weights/tiny-shapes`` (:mod:`nodes.training.family`); every stage is
seeded, and each trainer stops at its time budget (``--minutes-*``) or its step cap (``--steps-*``), whichever
comes first. The report ``training.json`` records the steps each model took, so a run with ``--steps-X`` set to
those counts (and generous minutes) repeats the same updates on the same data and noise.

Stages
------
1. **Data** (:mod:`.common`): ``--samples`` images from ``nodes.shapes.data.batch(seed, n, TRAIN_WEIGHTS,
   TRAIN_P_POSITION)``: the grammar's captions with more stated positions and relations than its own balance; the
   same fixed set serves every stage.
2. **VAE** (:mod:`.vae`; 64x64x3 -> 16x16x4, ``space="tiny-shapes"``): L1 + MSE reconstruction of a posterior
   draw plus a small KL term. Afterwards ``shift_factor`` / ``scaling_factor`` are set from the posterior means
   (scaled latents have mean 0 and std 1) and reconstructions are checked with the shapes evaluator. Every image
   is then encoded once (posterior mean, scaled) so no stage re-encodes.
3. **Text encoder** (:mod:`.text`), pretrained alone to parse captions (``pretrain_text``: every slot of the
   caption's spec predicted from the pooled vector), then frozen: each distinct caption is encoded once for the
   denoisers.
4. **DiT** (:mod:`.denoiser`, as the U-Net), rectified flow: ``t`` drawn logit-normal(0, 1) and shifted SD3-style
   by ``--dit-shift`` (3: most updates at high noise, where the layout is decided), ``x = (1 - t) x0 + t noise``,
   target velocity ``noise - x0``. The DiT has U-ViT long skips (``--dit-long-skip``) and Mix-FFN blocks
   (``--dit-mix-ffn``), and its cross-attention sees 4 tokens mapped from the pooled caption vector instead of the
   byte tokens (``--dit-pooled-tokens``, ``--dit-text-tokens``; ``DiTConfig.pooled_tokens``); it trains at batch
   32 with learning rate 2e-3, decaying linearly to 0 over the last 30 % of its budget (``--decay-dit``);
   docs/models.md has the pilots that chose this recipe.
5. **U-Net** (``position_embedding``: its attention layers know where each token is), ``v`` prediction on the
   ``sd15`` discrete VP schedule, continuous timesteps with density rising toward high noise
   (``--unet-high-noise``).

Both denoisers drop 10 % of captions to ``""`` (classifier-free guidance) and keep an EMA of their weights,
which is what ships. The loss calls the network through the engine's own path,
:meth:`nodes.adapters.DenoiserModel.network_output`, on ``noised(...)`` against ``training_target(...)`` of
:mod:`nodes.diffusion.parameterization`, so a trained network samples correctly through it;
``tests/nodes/test_training.py`` checks that ``to_denoised`` of the training target is the clean latent.

``--processes N`` trains the denoisers in N data-parallel processes of one thread each
(``denoiser.train_denoiser_parallel``), which can use CPU cores better than intra-op threads do. ``--only dit``
(or ``unet``) retrains one denoiser against an existing family's VAE and text encoder (``--family``) and
replaces only its folder and its record in ``training.json`` (``family.retrain_denoiser``).

The ControlNets are trained after the family by ``python -m nodes.training.controlnet`` (:mod:`.controlnet`;
``python -m nodes.training_controlnet``, the command recorded in the shipped ``controlnet_training.json``, is
kept as an alias).

``OMP_WAIT_POLICY=PASSIVE`` is set before torch loads: with two threads on cores shared with other
processes, OpenMP's spinning barriers otherwise cost up to 3x.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
