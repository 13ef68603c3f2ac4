"""lock: a method's environment solved into lock files that record no mirror. `backends` (conda, pip,
poetry; one registry) describe lock and install steps; `adapt` and `repository_pins` take a third-party
repository's own files as they are; `methods` is `envmgr method add`; `lock` is the verb; `uv_cache` is the
uv cache every step shares. May import: images, door, core."""
