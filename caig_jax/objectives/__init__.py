"""Losses as pure functions of arrays (no models, no trainers)."""
