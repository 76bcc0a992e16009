"""Foundation shared by every domain: settings, database, clock, errors, crypto, principals.

Imports nothing else of govbroker.
"""
