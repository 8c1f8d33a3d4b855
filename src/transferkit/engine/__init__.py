"""The one training engine: the loop, the phase runner, checkpoints and exact resume, the probe.

:mod:`~transferkit.engine.config` (settings, validated; no torch),
:mod:`~transferkit.engine.loop` (the loop), :mod:`~transferkit.engine.probe`
(the linear probe on cached features), :mod:`~transferkit.engine.checkpoints`
and :mod:`~transferkit.engine.trainer` (a fit's phases on one backbone).
Import from those modules; this package imports nothing, so the settings stay
importable without torch.
"""
