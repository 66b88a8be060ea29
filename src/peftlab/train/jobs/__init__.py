"""The job layer: what `peftlab train`, `eval`, `merge`, `compose` and `continual` do, as library calls (run_job,
run_eval, run_merge, run_compose, run_continual).

A job is one options dataclass (JobConfig, EvalConfig, MergeConfig: their fields are the command's flags and YAML
keys) and one call that returns the summary the command prints under --json; human-readable lines go to an
optional `say` callback. The command line (cli.py) only parses arguments and formats output.
"""
from .compose import run_compose
from .config import ComposeConfig, ContinualConfig, EvalConfig, JobConfig, JobError, MergeConfig
from .continual import run_continual
from .evaluate import run_eval
from .inputs import JobData, load_data, sample
from .merge import run_merge
from .run import PreparedJob, prepare_job, run_job, run_prepared

__all__ = ["ComposeConfig", "ContinualConfig", "EvalConfig", "JobConfig", "JobData", "JobError", "MergeConfig", "PreparedJob", "load_data",
           "prepare_job", "run_compose", "run_continual", "run_eval", "run_job", "run_merge", "run_prepared", "sample"]
