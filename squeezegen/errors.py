"""User-facing errors: each names the problem and what to do about it.

The CLI prints these as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class SqueezegenError(Exception):
    """A problem with what the user asked for (bad name, file, argument), not a bug."""


class UnknownModelError(SqueezegenError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UnsupportedModelError(SqueezegenError):
    pass


class MissingDependencyError(SqueezegenError, ImportError):
    pass


def one_line(exc: BaseException) -> str:
    """An exception's message on one line: library errors often span several."""
    return " ".join(str(exc).split()) or type(exc).__name__
