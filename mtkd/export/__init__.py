"""Deployment of trained models: structured pruning (:mod:`mtkd.export.prune`) and
ONNX export (:mod:`mtkd.export.onnx`). Both need the ``export`` extras
(``pip install "mtkd[export]"``: torch-pruning, onnx, onnxruntime, onnxscript,
onnxslim); nothing here is imported by training."""
