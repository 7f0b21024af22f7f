"""Benchmarks and the quality ablation, run as modules from the repository root.

``python -m benchmarks.bench`` (efficiency), ``python -m benchmarks.ablation`` (quality),
``python -m benchmarks.profile_step``, ``python -m benchmarks.loader_speed``,
``python -m benchmarks.manifest_index`` and ``python -m benchmarks.device_pack``.
"""
