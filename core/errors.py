"""Errors whose message is meant for the user, in plain words.

The CLI prints them without a traceback and the GUI shows them as a pop-up. Anything else that
escapes is a bug and is shown with its traceback.
"""


class UserError(Exception):
    """A problem the user can fix: the message says what went wrong and what to do."""


class ConfigError(UserError):
    """A setting is unknown, has the wrong type or an impossible value."""


class DataError(UserError):
    """The images or captions cannot be used as given."""


class ModelLoadError(UserError):
    """The base model or an adapter file cannot be loaded."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), to quote inside a plain-words message."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
