"""The HTTP layer: thin routes over the inference service."""
