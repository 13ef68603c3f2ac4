"""face: what people type and read. `cli` parses and calls one function per verb, rendering errors in one
place; `doctor` shows the effective config and what is missing; `demo` is `make demo`. May import: all."""
