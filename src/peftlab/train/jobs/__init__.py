"""The job layer: what `peftlab train`, `eval` and `merge` do, as library calls (run_job, run_eval, run_merge).

A job is one options dataclass (JobConfig, EvalConfig, MergeConfig: their fields are the command's flags and YAML
keys) and one call that returns the summary the command prints under --json; human-readable lines go to an
optional `say` callback. The command line (cli.py) only parses arguments and formats output.
"""
from .config import EvalConfig, JobConfig, JobError, MergeConfig
from .evaluate import run_eval
from .inputs import JobData, load_data, sample
from .merge import run_merge
from .run import PreparedJob, prepare_job, run_job, run_prepared

__all__ = ["EvalConfig", "JobConfig", "JobData", "JobError", "MergeConfig", "PreparedJob", "load_data",
           "prepare_job", "run_eval", "run_job", "run_merge", "run_prepared", "sample"]
