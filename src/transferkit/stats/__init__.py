"""Statistics of everything a user compares: metrics, intervals, paired tests, calibration, LogME.

* :mod:`~transferkit.stats.metrics`      test metrics with intervals, ECE, per-example predictions
* :mod:`~transferkit.stats.intervals`    Wilson and percentile-bootstrap intervals; every test score with its interval
* :mod:`~transferkit.stats.paired`       paired differences on the same examples + McNemar's exact test, over seeds
* :mod:`~transferkit.stats.crossval`     the cross-validated linear probe (out-of-fold accuracy and probabilities)
* :mod:`~transferkit.stats.checks`       validation of the statistics' inputs
* :mod:`~transferkit.stats.calibration`  ECE, reliability bins, temperature scaling
* :mod:`~transferkit.stats.logme`        LogME transferability scores and rank agreement
* :mod:`~transferkit.stats.wording`      how a ratio or an interval reads in a sentence

Pure numpy/scipy on arrays: nothing here knows about backbones, files or runs.
"""
