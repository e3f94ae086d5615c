"""The distillation core: ``seg_kl`` (pixel KL), ``det_mse`` (YOLO-style
obj/box/cls MSE), ``feat_gan`` (adversarial feature distillation), ``cwd``
(channel-wise distillation), ``pkd`` (Pearson-correlation feature imitation)
and ``mgd`` (masked generative distillation), with their shared helpers in
:mod:`.common`. Each module registers itself; :mod:`mtkd.losses` imports them
all."""
