"""The one training engine: the loop, the phase runner, checkpoints and exact resume, the probe.

:mod:`~transferkit.training.config` (settings, validated; no torch),
:mod:`~transferkit.training.loop` (the loop), :mod:`~transferkit.training.probe`
(the linear probe on cached features), :mod:`~transferkit.training.checkpoints`
and :mod:`~transferkit.training.trainer` (a fit's phases on one backbone).
Import from those modules; this package imports nothing, so the settings stay
importable without torch.
"""
