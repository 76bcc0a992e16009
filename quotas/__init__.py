"""Resource classes, hierarchical quotas with validity windows, the reservation ledger and quota
change requests."""
