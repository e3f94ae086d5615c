"""Adversarial robustness: L-inf attacks (:mod:`mtkd.adversarial.attacks`) and the ``mtkd attack``
report (:mod:`mtkd.adversarial.report`). Adversarial training and distillation are losses
(``adv_kd``, ``pgd_at``, ``trades`` in :mod:`mtkd.losses.adversarial`)."""
from mtkd.adversarial.attacks import (ATTACKS, AttackSpec, attack_batch, attack_classifier,  # noqa: F401
                                      attack_multitask, make_attack, parse_eps, perturb)
