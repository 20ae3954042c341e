"""The built-in cache tiers: `host` (RAM), `disk` (block files), `redis` (shared)."""
