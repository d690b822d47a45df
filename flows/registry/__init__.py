"""The model registry: register a trained package, the champion gate and promotion history, the pickle-free
served model, and the reports logged beside each version."""
