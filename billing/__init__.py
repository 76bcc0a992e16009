"""Metering and 统采分签 billing: price catalogs, contracts, usage intervals, statements."""
