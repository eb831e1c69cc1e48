"""Upstream connections: where accepted events go."""
