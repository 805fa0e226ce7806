"""Bundled toy demo model: a procedural produce-image generator and its trainer.

The demo model is trained on synthetic pictures only; it is not a real produce
classifier. See ``README.md`` in this folder.
"""
