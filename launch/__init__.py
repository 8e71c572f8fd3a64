"""privtune.launch: the ``privtune`` CLI, the typed config, run directories, the stage runner and sweeps.

- ``config``    pydantic schema (unknown keys refused; the privacy section frozen), YAML + key=value overrides
- ``cli``       thin entry points; every user error exits 2 with one line
- ``rundir``    atomic run dirs and stage folders (write to a temporary path, rename when complete)
- ``pipeline``  data -> train -> eval, finished stages skipped, distributed-aware
- ``sweep``     grids and variants of runs, and the comparison table
- ``progress``  progress bars on a terminal, periodic lines in log files
"""
