"""Strategies (x backbones x seeds) side by side on one split, measured, and the one verdict.

* :mod:`~transferkit.compare.run`      compare(): each strategy fitted on the same split; choose_backbone (fit --models)
* :mod:`~transferkit.compare.results`  StrategyResult and Comparison: the typed records every page and the verdict read
* :mod:`~transferkit.compare.verdict`  each strategy against the best by a paired test; a winner only beyond noise
* :mod:`~transferkit.compare.ranking`  backbones ranked by the cross-validated probe, LogME, costs and latency
"""
