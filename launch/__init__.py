"""privtune.launch: the ``privtune`` CLI, the typed config, run directories, the stage runner and sweeps.

- ``config``    pydantic schema (unknown keys refused; the privacy section frozen), YAML + key=value overrides
- ``cli``       thin entry points; every user error exits 2 with one line
- ``preflight`` every check that needs no real work, before anything is written (validate runs it too)
- ``rundir``    atomic run dirs and stage folders (write to a temporary path, rename when complete)
- ``stages``    which stages are still valid: reuse / redo (with the reasons) / resume / refuse, from their records
- ``pipeline``  data -> train -> eval in order, distributed-aware
- ``sweep``     grids and variants of runs, and the comparison table
"""
