"""The errors linmix reports to a user as one line (the CLI exits with code 2 on them).

Library code raises `ValueError`/`TypeError` for bad arguments, as Python does; these classes mark
the problems that come from outside the program (a command line, a file on disk) so the command line
can report them without a traceback.
"""


class LinmixError(Exception):
    """A problem the user can fix; the CLI prints its message as one line and exits with code 2."""


class UsageError(LinmixError):
    """A problem with the command line: an unknown name, a value out of range, flags that do not fit."""


class CheckpointError(LinmixError, ValueError):
    """A checkpoint file that cannot be used: missing, cut short, corrupted or of an unknown format.

    The message names the file and what is wrong with it.
    """
