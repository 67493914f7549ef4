"""Running the `unimedvl` command line inside the test process."""

import contextlib
import io

from unimedvl_pipelines.cli import main


def run_in_process(args):
    """`main()` in this process: (exit status, stdout, stderr); usage errors exit through SystemExit."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as exit:
            code = exit.code
    return code, stdout.getvalue(), stderr.getvalue()


__all__ = ["run_in_process"]
