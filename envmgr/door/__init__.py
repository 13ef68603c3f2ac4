"""door: the one way to the Docker Engine. `engine` is the only module that talks to it (docker SDK, plain
values back); `containers` describes what to run, `steps` runs a backend's step in a container, `mirrors`
turns the site config into container env and mounts, `logs` reads container output, `context` hands every
verb its config, output, engine and step runner. May import: core."""
