"""Helpers for the tests that run the ``amalgam`` command as a user's terminal does and signal it."""

import os
import signal
import subprocess
import sys
import time


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)
    return condition()


def amalgam(command: str, *args: str, **kwargs) -> subprocess.Popen:
    """``amalgam COMMAND ARGS`` at one thread. SIGINT goes back to its default in the child: a test run started in
    the background inherits it ignored, and Python then installs no KeyboardInterrupt handler (as a user's
    terminal would)."""
    return subprocess.Popen([sys.executable, "-m", "amalgam_plugin.cli", command, *args], text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)
