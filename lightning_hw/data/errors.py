"""The errors of the data modules: a data file that is missing, or one whose content is wrong."""

from __future__ import annotations


class DataFormatError(ValueError):
    """A data file exists but its content is not what the data set format promises."""


class DataNotFoundError(FileNotFoundError):
    """A data file or folder is missing; the message says where to get it and where to put it."""

