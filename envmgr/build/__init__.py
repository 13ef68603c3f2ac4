"""build: a method's image from its lock. `target` (a library: inputs, hash, tag, layer records, method
layer, image config, build locks) is what every later stage imports; `build` is the verb that assembles and
loads; `layers` installs per-distribution layers; `system_layer`, `gpu_image`, `sonames`/`elf_needed`
(missing system libraries), `sbom`, `layer_bytes` (layer bytes back from the engine), `layer_record`.
May import: lock, images, door, core."""
