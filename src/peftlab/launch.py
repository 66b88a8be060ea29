"""`peftlab train --nproc N` runs the same command as N processes under torchrun (torch.distributed.run) through
this wrapper. A worker that fails has already printed its one-line error; torchrun's agent would add its own
report (log lines and a ChildFailedError traceback), so here it is quietened and only the worker's exit status
is passed on."""
from __future__ import annotations

import logging
import sys


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        codes = [failure.exitcode for failure in e.failures.values()]
        return next((c for c in codes if c > 0), 1)   # a signal (negative code) counts as a plain failure
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
