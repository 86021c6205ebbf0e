"""A one-line progress display for management commands, on a terminal only."""

import sys


def terminal_progress(stream, label: str, *, verbosity: int = 1):
    """A callback (done, total) that redraws one line, or None when output is not a terminal."""
    if verbosity < 1 or not getattr(stream, "isatty", lambda: False)():
        return None

    def show(done: int, total: int) -> None:
        percent = 100 * done // total if total else 100
        stream.write(f"\r{label}: {percent:3d}% ({done:,}/{total:,})")
        if done >= total:
            stream.write("\n")
        stream.flush()

    return show


def stderr_progress(label: str, verbosity: int):
    return terminal_progress(sys.stderr, label, verbosity=verbosity)
