"""Scheduled jobs: what runs periodically, and the APScheduler wiring that runs it."""
