"""The one family of errors a user can cause and fix.

Each is raised once, where the problem is found, with a message that names the file, flag or value at fault;
every entry script turns it into one line on stderr and exit code 2 (`utils.run_main`). Nothing re-wraps them
on the way up.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, wrong shape): printed as one line, exit 2."""


class ConfigError(UserError):
    """A setting that cannot work: a bad value, an unknown field, an unreadable config file."""


class DatasetError(UserError):
    """The text data set named cannot be read or holds no text."""


class ModelError(UserError):
    """The language model or hook asked for does not exist or cannot be used."""


class StoreError(UserError):
    """A stored activation dataset is missing, corrupt or was made for other settings."""


class CheckpointError(UserError):
    """A checkpoint or run folder belongs to other settings, or a folder cannot be used for this run."""


class SAEFolderError(UserError):
    """A folder is not a readable SAE in the SAELens layout."""


class BusyError(UserError):
    """Another process is writing the folder asked for (a run folder, an activation store)."""
