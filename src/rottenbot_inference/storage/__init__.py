"""Saved predictions: a durable local outbox drained into an image store and a database.

`PredictionStore` (service.py) is the use case the HTTP layer calls; `outbox.py` makes an
acknowledged save survive outages and `kill -9`; `images.py` and `db.py` are the two sinks.
"""
