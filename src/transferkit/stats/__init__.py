"""Statistics of everything a user compares: metrics, intervals, paired tests, calibration, LogME.

* :mod:`~transferkit.stats.metrics`      test metrics with intervals, ECE, per-example predictions
* :mod:`~transferkit.stats.evidence`     Wilson and bootstrap intervals, paired differences + McNemar, the cross-validated probe
* :mod:`~transferkit.stats.calibration`  ECE, reliability bins, temperature scaling
* :mod:`~transferkit.stats.logme`        LogME transferability scores and rank agreement
* :mod:`~transferkit.stats.wording`      how a ratio or an interval reads in a sentence

Pure numpy/scipy on arrays: nothing here knows about backbones, files or runs.
"""
