"""runs: a method run in its image. `run` is the local target and the verb; `slurm` the Slurm target;
`records` (run.json, log.txt), `datasets`, `inputs`, `method_files`, `outputs`, `owned` (trees a method
writes, never followed through a link), `verdict` (honest success), `gpu_host`/`gpu_plan` (GPU preflight).
May import: ship and below (not gc)."""
