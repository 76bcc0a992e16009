"""The HTTP face of govbroker: JSON API under /api/v1, health and metrics endpoints."""
