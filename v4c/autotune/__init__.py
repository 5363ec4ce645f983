"""Per-architecture kernel tuning and the shared tuning cache. Not built yet (needs codegen)."""
