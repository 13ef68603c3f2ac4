"""runs: a method run in its image. `plan` is what a run is before it starts (request, model and dataset,
inputs, user, entry command: a library every target imports); `records` is run.json (a typed record with its
`Status`, read and written there only) and log.txt; `targets` is the table `--on` picks from (`local`: `run`,
this host's engine; `slurm`: the site's Slurm, whose job steps are local runs); `ledger` lists, finds,
refreshes and cancels runs through their target, and `settle` ends a record whose envmgr died. Beside them:
`datasets`, `inputs`, `method_files`, `outputs`, `owned` (trees a method writes, never followed through a
link), `verdict` (honest success), `gpu_host`/`gpu_plan` (GPU preflight).
One way inside: plan/records/settle < run < slurm < targets < ledger (no module imports one after it).
May import: ship and below (not gc)."""
