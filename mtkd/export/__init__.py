"""Deployment of trained models: structured pruning (:mod:`mtkd.export.prune`),
ONNX export (:mod:`mtkd.export.onnx`), running an exported file in onnxruntime
(:mod:`mtkd.export.runtime`) and its static INT8 quantisation
(:mod:`mtkd.export.quantize`). They need the ``export`` extras
(``pip install "mtkd[export]"``: torch-pruning, onnx, onnxruntime, onnxscript,
onnxslim); nothing here is imported by training."""
