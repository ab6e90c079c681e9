"""``snakemake`` whose SLURM executor checks its jobs' status every second, for the cluster tests.

The SLURM executor plugin lengthens the wait between status checks by 10 s
after every check that finds no job finished (up to 180 s; its docs,
"further.md"), whatever ``--seconds-between-status-checks`` says: right for a
real cluster's jobs of minutes, but these jobs take seconds, and a run of
twelve of them waited about 12 s per job and 30 s for the last. Only the wait
is changed: the jobs are submitted, run and tracked by the plugin as in any
run. Usage: ``python snakemake_polling_every_second.py SNAKEMAKE-ARGS...``.
"""

import sys

import snakemake_executor_plugin_slurm as slurm_plugin
from snakemake.cli import main

SECONDS = 1

# The wait is this property of the executor (snakemake_interface_executor_plugins' RemoteExecutor);
# the plugin sets it after each status check.
slurm_plugin.Executor.next_seconds_between_status_checks = property(lambda self: SECONDS, lambda self, value: None)

if __name__ == "__main__":
    sys.argv[0] = "snakemake"
    sys.exit(main())
