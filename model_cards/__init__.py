"""Jinja templates of the model cards that `bonevision push` renders."""
