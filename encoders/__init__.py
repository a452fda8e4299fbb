"""Feature extractors for point clouds and states (filled in by the policy work)."""
