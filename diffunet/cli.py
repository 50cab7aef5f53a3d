"""What every command line of diffunet shares: an argparse parser whose errors are one line.

argparse prints the whole usage block before its error line; with a dozen options that buries the one line that
says what is wrong. Ours prints ``<prog>: error: <what>`` and where to read the options, and exits with 2 as
argparse does.
"""

from __future__ import annotations

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with a one-line error: the message and a pointer to ``--help``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def fail(message: str, code: int = 2) -> int:
    """Print ``error: message`` on stderr and return ``code``, the command's exit status."""
    print(f"error: {message}", file=sys.stderr)
    return code
