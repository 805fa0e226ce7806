"""Model runtime, image pipeline, batching and model loading."""
