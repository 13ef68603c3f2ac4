"""core: what every stage shares and nothing in envmgr is below — errors (one type, exit code and hint),
paths and label keys, names (untrusted text into names and host paths), files (atomic writes, locks), the
site config and its credentials, method specs and variants, TOML reading, archives, GPU request values,
and the output for people and machines (ui). May import: nothing else in envmgr."""
