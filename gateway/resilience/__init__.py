"""Resilience: circuit breakers, retry policies and their windows, per provider; no HTTP."""
