"""A trained run in deployable formats, each checked for output parity before it is written.

* :mod:`~transferkit.export.onnx`  ONNX and TorchScript export, OnnxClassifier
* :mod:`~transferkit.export.int8`  int8 ONNX (ONNX Runtime static quantization), accuracy and speed measured first
"""
