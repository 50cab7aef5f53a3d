"""The network and its pipelines: exactly what travels inside an exported pipeline folder, which loads where
diffunet is not installed. It imports torch, diffusers, einops and itself only (``tests/test_imports.py`` checks
it); ``diffunet.export`` copies this folder whole.

- ``tables``: ``choose`` (one-line errors for a switch's options) and ``as_size``
- ``kernels``: CPU kernels the blocks call (dropout, attention, nearest-up + conv)
- ``nn``: the building blocks and their switch tables (``DOWNSAMPLE``, ``UPSAMPLE``, ``SKIP``, ``NORMS``, ...)
- ``unet``: ``UNet``, the U itself, with ``tiling()`` / ``plan()``
- ``tiles``: overlap-tile inference for any UNet
- ``pipeline``, ``segment_pipeline``: ``DiffunetPipeline``, ``DiffunetSegmentationPipeline``
"""
