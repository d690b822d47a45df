"""`lmp`, the command line: ``commands`` (the app: run, plan, list, sweep, and the error handling of `main`),
``models`` (compare, models, promote, rollback, generate), ``servers`` (up, down, ui, schedule) and ``common``
(consoles, error lines, pipelines.yaml loading) — each imports ``common``, none imports another's commands."""
