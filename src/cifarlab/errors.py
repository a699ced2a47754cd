"""The tool's own error type.

Every failure the user can cause (bad data, bad options, bad files) is raised as a
:class:`CifarlabError` whose message names the bad value and what would be valid. The CLI
prints these as one paragraph, without a traceback. :func:`short_list` shortens the lists of
names that such messages, the logs and the reports give; :func:`did_you_mean` names the valid
one a misspelt name was probably meant to be.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from pathlib import Path


def short_list(names: Sequence[str], most: int = 10) -> str:
    """``names`` joined by commas, the first ``most`` only, then how many more there are."""
    shown = ", ".join(names[:most])
    return shown if len(names) <= most else f"{shown} and {len(names) - most} more"


def did_you_mean(name: str, valid: Iterable[str], prefix: str = "") -> str:
    """`` (did you mean 'x'?)`` where one of ``valid`` is close to ``name`` (a typo), else ``''``:
    to follow the bad value in a message, before the list of valid ones. ``prefix`` goes before
    the name shown (``synthetic:`` of ``synthetic:gaussian``), not into the comparison."""
    # above difflib's 0.6, for 'lenet' is no typo of 'resnet20' (0.62); 'dgo' is one of 'dog' (0.67)
    near = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.65)
    return f" (did you mean '{prefix}{near[0]}'?)" if near else ""


class CifarlabError(Exception):
    """A user-facing error: the message is complete and is shown without a traceback."""


class DataError(CifarlabError):
    """The data given (archive, folder, batch file) is missing, corrupt or malformed."""


class ConfigError(CifarlabError):
    """An option, config file or value is invalid."""


class TrainingInterrupted(CifarlabError):
    """Training stopped on Ctrl-C or SIGTERM after saving a checkpoint: ``what`` says where it
    stopped, ``resume`` is the folder that ``--resume`` continues, ``saved`` what it keeps.
    Defined here, not in ``train``, so that the CLI can catch it without importing PyTorch for
    ``--help``."""

    def __init__(self, what: str, resume: Path, saved: str = "a checkpoint was saved"):
        super().__init__(f"{what}; {saved}. Resume with: cifarlab train --resume {resume}")
        self.what, self.resume = what, resume
