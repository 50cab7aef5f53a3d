"""A training run: the loop (``loop``: ``train``, ``Trainer``, the checks before any compute), its checkpoints
(``state``: sealed folders, resume, RNG), post-hoc EMA snapshots (``power_ema``), precision and fast paths
(``precision``), the CPU-load watch (``pace``) and batch norm across processes (``batchnorm``).

This file imports nothing: the loop uses most of the toolkit, while sampling and the export use ``precision``
and ``state`` only, and importing any module of a package runs its ``__init__`` first.
"""
