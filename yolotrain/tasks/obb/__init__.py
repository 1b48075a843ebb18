"""Oriented boxes: a rotated rectangle per object (trainer, validator, predictor)."""
