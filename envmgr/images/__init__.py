"""images: deterministic image bytes. `image` writes layer tars and image configs itself (same inputs, same
digests, on any machine); `base` builds the Debian + Python base images every step and method runs on.
May import: door, core."""
