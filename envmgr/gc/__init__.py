"""gc: what may go. `gc` is the verb (superseded images, stopped containers, stale cache entries, never
what is in use), `caches` (what each cache holds and the trimming rule), `disk` (bytes per method).
May import: ship and below (not runs)."""
