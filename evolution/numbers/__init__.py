"""Number representations across snapshots: the generalized helix (Kantamneni & Tegmark 2025)."""
