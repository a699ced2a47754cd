"""The tool's own error type.

Every failure the user can cause (bad data, bad options, bad files) is raised as a
:class:`CifarlabError` whose message names the bad value and what would be valid. The CLI
prints these as one paragraph, without a traceback.
"""


class CifarlabError(Exception):
    """A user-facing error: the message is complete and is shown without a traceback."""


class DataError(CifarlabError):
    """The data given (archive, folder, batch file) is missing, corrupt or malformed."""


class ConfigError(CifarlabError):
    """An option, config file or value is invalid."""
