"""Operator visibility: Prometheus metrics, health endpoints, the access log."""
