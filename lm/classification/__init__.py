"""Text classification on top of the language models: labelled data, a pooled head, metrics, stages.

A classifier is a backbone — any of our language models, freshly built or loaded from a registered
version — plus ``pooling → dropout → linear``. It trains through the one loop in ``lm.training``.
"""
