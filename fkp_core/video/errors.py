"""The one exception type of fkp_core.video: a file and the plain reason it cannot be read."""

from __future__ import annotations

import os


class VideoError(RuntimeError):
    """A video that cannot be read (or read fully); the message names the file and the reason.

    ``last_good_index`` is the index of the last frame delivered before a decoding error (None
    when none was, or when the error is not a decoding error).
    """

    def __init__(self, path: str | os.PathLike, reason: str, last_good_index: int | None = None):
        self.path = str(path)
        self.reason = reason
        self.last_good_index = last_good_index
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep the fields across pickling (Ray ships exceptions between processes)
        return (type(self), (self.path, self.reason, self.last_good_index))
