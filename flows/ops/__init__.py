"""Local operations: the servers `lmp up` starts, the temporary Prefect server of `lmp run`, schedules,
training slots, machine facts and `lmp gc`."""
