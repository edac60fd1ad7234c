"""Thin callbacks over :func:`batchgap.track` for training frameworks, each an optional extra.

``batchgap.integrations.lightning.GeometryCallback`` (``pip install batchgap[lightning]``) and
``batchgap.integrations.huggingface.GeometryCallback`` (``pip install batchgap[huggingface]``). Nothing else in
batchgap imports this package; each module imports its framework when it is imported.
"""
