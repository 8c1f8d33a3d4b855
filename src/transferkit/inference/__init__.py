"""Frozen forward passes: devices and precision, feature extraction and predict_logits, the engines that run them.

* :mod:`~transferkit.inference.extraction`  devices, precision, autocast; extraction through a Cut; predict_logits
* :mod:`~transferkit.inference.settings`    engines, devices and precisions, validated (no torch)
* :mod:`~transferkit.inference.runners`     the engine of frozen passes: OpenVINO on the CPU (converted model cached), else torch
"""
