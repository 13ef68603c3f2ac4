"""ship: carrying images to servers. `transfer` (export/import, one archive), `manifest` (its head),
`thin` (leave out what the target has), `trust` and `signing` (signatures, strict structure checks),
`registry` (push/pull by content tag), `squashfs` (enroot images), `verify`. May import: build and below."""
