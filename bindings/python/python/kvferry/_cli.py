"""The ``kvferry`` command (``kvferry bench``, ``serve``, ``info``, ...), installed with the package
as a console script and as ``python -m kvferry``; the same command line as the native binary."""

import os
import signal
import sys

from kvferry import _kvferry


def main() -> int:
    # Ctrl-C ends the command as it ends the native binary (Python would only see it once the
    # command returned).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    # Commands that start copies of themselves start this interpreter with `-m kvferry`.
    os.environ[_kvferry.CLI_PYTHON_ENV] = sys.executable
    return _kvferry.cli_main(["kvferry", *sys.argv[1:]])
