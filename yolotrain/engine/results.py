"""results.csv: one row per completed epoch, written atomically so a crash never leaves half a file."""

import csv
import io
import math
from pathlib import Path

from yolotrain.utils.checkpoint import save_atomic_text


def _format(value):
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


class ResultsCSV:
    """The run's results.csv; rows are dicts whose keys are the columns (first row fixes the order)."""

    def __init__(self, path):
        self.path = Path(path)
        self._unwritten = []  # rows whose write failed (disk full); written together with the next row

    def read(self):
        """All rows as dicts of floats (missing file: no rows), including rows not yet on disk."""
        return self._read_file() + [dict(row) for row in self._unwritten]

    def _read_file(self):
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]

    def append(self, row):
        """Add one row, rewriting the file atomically. If the write fails (OSError) the row is kept in memory,
        written with the next successful append, and the error re-raised; the file on disk stays whole."""
        rows = self.read() + [row]
        try:
            self._write(rows)
        except OSError:
            self._unwritten.append(dict(row))
            raise
        self._unwritten = []

    def reset(self):
        """Start with no rows (a fresh run reusing a folder must not continue an old run's table)."""
        self._unwritten = []
        self.path.unlink(missing_ok=True)

    def keep_epochs_up_to(self, epoch):
        """Drop rows after `epoch` (1-based), so a resumed run continues without duplicates."""
        rows = self.read()
        kept = [r for r in rows if r["epoch"] <= epoch]
        if len(kept) != len(rows):
            self._write(kept)
            self._unwritten = []

    def _write(self, rows):
        columns = list(rows[-1].keys()) if rows else []
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_format(row.get(c, float("nan"))) for c in columns])
        save_atomic_text(buffer.getvalue(), self.path)
