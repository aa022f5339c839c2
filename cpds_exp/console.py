"""Log lines on the console that leave progress bars whole (Hydra's job logging uses this handler)."""
from __future__ import annotations

import logging

from tqdm.auto import tqdm


class ProgressBarSafeHandler(logging.StreamHandler):
    """Prints through ``tqdm.write``, which clears the progress bars, prints the line and redraws them,
    so a log line of an edit never lands inside the images and iterations bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # as logging.StreamHandler: report through logging's own error hook
            self.handleError(record)
