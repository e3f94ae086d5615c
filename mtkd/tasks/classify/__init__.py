"""Image classification: ImageFolder data, classifiers, evaluation, predict, drawing, the ``classify`` task.

The task module (:mod:`mtkd.tasks.classify.task`) registers ``classify`` with
the trainer's task registry when imported; the losses (``ce``, the zoo) live in
:mod:`mtkd.losses`.
"""
from mtkd.tasks.classify.data import (ImageFolderDataset, build_transform, collate, compute_mean_std,  # noqa: F401
                                      find_classes, parse_labels_file)
from mtkd.tasks.classify.models import Cnn4, TappedClassifier, build_classifier, load_weights  # noqa: F401
from mtkd.tasks.classify.predict import predict_folder  # noqa: F401
from mtkd.tasks.classify.synthetic import make_synthetic_imagefolder  # noqa: F401
