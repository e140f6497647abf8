"""Bad-row errors and the counters every dataset builder fills.

A row is *bad* when it cannot be used as written (not UTF-8, not JSON, a missing or mistyped
field, an empty completion, a prompt that leaves no room for a response). Bad rows follow the
`on_bad_row` policy: `"error"` raises `DataError` naming `file:line` and the field, `"skip"` counts
them per reason and logs a summary. A row is *dropped* when it is well formed but useless for
training (a preference pair whose responses are identical, or an empty response); drops are
counted under either policy.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Literal

logger = logging.getLogger(__name__)

OnBadRow = Literal["error", "skip"]
ON_BAD_ROW_CHOICES: tuple[str, ...] = ("error", "skip")
OnLongRow = Literal["truncate", "skip", "error"]
ON_LONG_ROW_CHOICES: tuple[str, ...] = ("truncate", "skip", "error")


class DataError(ValueError):
    """A dataset row that cannot be used; the message starts with `where` (`file:line`).

    Attributes:
      where: location of the row, `path:line` for JSONL, `path:row N` for parquet/JSON/hub rows.
      field: the offending field (`None` when the whole row is at fault, e.g. not JSON).
      reason: a short machine-readable cause used as the skip counter key (`"missing_field"`, ...).
    """

    def __init__(self, where: str, field: str | None, reason: str, detail: str):
        self.where = where
        self.field = field
        self.reason = reason
        location = f"{where}: field {field!r}" if field is not None else where
        super().__init__(f"{location}: {detail} [{reason}]")


def check_on_bad_row(on_bad_row: str) -> None:
    if on_bad_row not in ON_BAD_ROW_CHOICES:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW_CHOICES}, got {on_bad_row!r}")


class RowStats:
    """Counts of rows read, kept, skipped (bad, per reason), dropped (per reason) and truncated.

    `on_long_row` says what a row longer than the length limits gets: `"truncate"` (counted per
    field in `truncated`), `"skip"` (counted in `dropped["too_long"]`) or `"error"` (`DataError`).
    """

    def __init__(self, on_bad_row: OnBadRow = "error", on_long_row: OnLongRow = "truncate"):
        check_on_bad_row(on_bad_row)
        if on_long_row not in ON_LONG_ROW_CHOICES:
            raise ValueError(
                f"on_long_row must be one of {ON_LONG_ROW_CHOICES}, got {on_long_row!r}"
            )
        self.on_bad_row = on_bad_row
        self.on_long_row = on_long_row
        self.rows_read = 0
        self.rows_kept = 0
        self.skipped: collections.Counter[str] = collections.Counter()
        self.dropped: collections.Counter[str] = collections.Counter()
        self.truncated: collections.Counter[str] = collections.Counter()
        self.formats: collections.Counter[str] = collections.Counter()  # rows per dataset format
        self._first_skip: dict[str, str] = {}

    def bad_row(self, error: DataError) -> None:
        """Applies the policy: re-raises under `"error"`, counts under `"skip"`."""
        if self.on_bad_row == "error":
            raise error
        self.skipped[error.reason] += 1
        self._first_skip.setdefault(error.reason, str(error))

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    def truncate(self, what: str) -> None:
        self.truncated[what] += 1

    def long_row(self, where: str, field: str, detail: str) -> bool:
        """Applies `on_long_row` to a row whose `field` is too long: True = truncate it (counted),
        False = drop the row (counted); raises `DataError` under `"error"`."""
        if self.on_long_row == "error":
            raise DataError(where, field, "too_long", f"{detail} (data.on_long_row=error)")
        if self.on_long_row == "skip":
            self.drop("too_long")
            return False
        self.truncate(field)
        return True

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "skipped": dict(sorted(self.skipped.items())),
            "dropped": dict(sorted(self.dropped.items())),
            "truncated": dict(sorted(self.truncated.items())),
            "formats": dict(sorted(self.formats.items())),
        }

    def log_summary(self, name: str) -> None:
        logger.info(
            "%s data: read %d rows, kept %d; skipped %s; dropped %s; truncated %s",
            name,
            self.rows_read,
            self.rows_kept,
            dict(self.skipped) or "none",
            dict(self.dropped) or "none",
            dict(self.truncated) or "none",
        )
        for reason, message in sorted(self._first_skip.items()):
            logger.warning(
                "%s data: skipped %d bad rows (%s), first: %s",
                name,
                self.skipped[reason],
                reason,
                message,
            )
