"""What is frozen and deterministic is computed once and kept on disk: keyed, atomic, verified, locked.

* :mod:`~transferkit.cache.features`  backbone features per split (half precision, sharded under torchrun)
* :mod:`~transferkit.cache.pixels`    decoded, resized uint8 pixels for fine-tuning epochs (decode once)

Location: ``$TRANSFERKIT_CACHE``, else ``$XDG_CACHE_HOME/transferkit``, else ``~/.cache/transferkit``.
"""

DEFAULT_CACHE_BUDGET_GB = 10.0  # disk the frozen blocks' outputs of one fit may take (frozen-prefix caching)
