"""A folder of images plus a CSV of `filename,label` rows (Kaggle's layout): no files moved into class folders.

Filenames are relative to data.root; the classes are the labels found (sorted), or data.classes when given,
in which case a label outside it is refused. A listed file that is missing, outside data.root or not a
regular file is left out and listed (data.strict=true refuses it), as an unreadable image is.
"""
import csv
import os
import stat
from pathlib import Path

from lab.data import scan
from lab.data.base import Loaded
from lab.data.folder import ImageFolder
from lab.errors import LabError


class ImageCSV(ImageFolder):
    def __init__(self, csv: str | None = None, test_csv: str | None = None, filename_column: str = "filename",
                 label_column: str = "label", suffix: str = "", classes: list[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        if csv is None:
            raise LabError("data.csv is not set: point it at a CSV file with a filename and a label column, "
                           "e.g. data.csv=data/train.csv.")
        self.csv = Path(csv).expanduser()
        self.test_csv = Path(test_csv).expanduser() if test_csv else None
        self.filename_column, self.label_column, self.suffix = filename_column, label_column, suffix or ""
        self.declared = [str(c) for c in classes] if classes is not None else None

    @classmethod
    def small_settings(cls, scratch) -> dict:
        """24 generated PNGs in one flat folder and the CSV that labels them."""
        from PIL import Image

        scratch = Path(scratch)
        (scratch / "images").mkdir(parents=True, exist_ok=True)
        lines = ["filename,label"]
        for i in range(24):
            label = ("cat", "dog", "fox")[i % 3]
            Image.new("RGB", (12, 12), ((i % 3) * 120, 40 + i * 5, 200 - (i % 3) * 90)).save(scratch / "images" / f"{i}.png")
            lines.append(f"{i}.png,{label}")
        (scratch / "labels.csv").write_text("\n".join(lines) + "\n")
        return {"root": scratch / "images", "csv": scratch / "labels.csv", "cache_dir": scratch / "cache"}

    def check_source(self) -> None:
        super().check_source()
        for path in (self.csv, self.test_csv):
            if path is not None and not path.is_file():
                raise LabError(f"data.{'csv' if path == self.csv else 'test_csv'}={path} is not a file.")

    def rows(self, path: Path) -> list[tuple[str, str, int]]:
        """(filename, label, line number) of each row, with the columns and values checked."""
        key = "csv" if path == self.csv else "test_csv"
        if not path.is_file():
            raise LabError(f"data.{key}={path} is not a file.")
        with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a BOM from Excel is not a column
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            missing = [c for c in (self.filename_column, self.label_column) if c not in columns]
            if missing:
                raise LabError(f"data.{key}={path} has no column(s) {missing}: its columns are {columns}. Set "
                               "data.filename_column and data.label_column to the ones that hold them.")
            out = []
            for line, row in enumerate(reader, start=2):
                name, label = (row[self.filename_column] or "").strip(), (row[self.label_column] or "").strip()
                if not name or not label:
                    raise LabError(f"data.{key}={path} line {line}: empty {'filename' if not name else 'label'}.")
                out.append((name, label, line))
        if not out:
            raise LabError(f"data.{key}={path} has a header but no rows.")
        return out

    def _classes(self, rows: list[tuple[str, str, int]], path: Path) -> list[str]:
        if self.declared is None:
            return sorted({label for _, label, _ in rows})
        unknown = next(((label, line) for _, label, line in rows if label not in self.declared), None)
        if unknown is not None:
            raise LabError(f"{path} line {unknown[1]}: label {unknown[0]!r} is not one of data.classes "
                           f"{self.declared}: add it there, or set data.classes=null to take the labels found.")
        return list(self.declared)

    def _samples(self, rows, classes: list[str], path: Path) -> scan.Listing:
        real_root = os.path.realpath(self.root)
        index = {c: i for i, c in enumerate(classes)}
        found = scan.Listing(classes, [])
        labels: dict[str, tuple[str, int]] = {}
        for name, label, line in rows:
            file = self.root / (name + self.suffix)
            real = os.path.realpath(file)
            if real in labels:
                if labels[real][0] != label:
                    raise LabError(f"{path} line {line}: {name} is labelled {label!r} here and "
                                   f"{labels[real][0]!r} on line {labels[real][1]}.")
                continue
            labels[real] = (label, line)
            try:
                st = os.stat(real)
            except OSError:
                found.skipped.append(f"{file}: missing (line {line} of {path.name})")
                continue
            if not (real == real_root or real.startswith(real_root + os.sep)):
                found.skipped.append(f"{file}: outside data.root (line {line} of {path.name})")
            elif not stat.S_ISREG(st.st_mode):
                found.skipped.append(f"{file}: not a regular file (line {line} of {path.name})")
            else:
                found.samples.append((str(file), index[label]))
        if self.strict and found.skipped:
            raise LabError(f"{len(found.skipped)} file(s) listed in {path} cannot be read, with data.strict=true: "
                           f"{found.skipped[:5]}. Fix the CSV or set data.strict=false.")
        if not found.samples:
            raise LabError(f"none of the {len(rows)} files listed in {path} is under data.root={self.root} "
                           f"(the first: {found.skipped[0] if found.skipped else '?'}): is data.root the folder "
                           "the filenames are relative to?")
        return found

    def load(self) -> Loaded:
        if self.image_size is None:
            raise LabError("data.image_size is not set: an image folder needs one size, e.g. data.image_size=64.")
        self.check_source()
        size, channels = int(self.image_size), int(self.channels or 3)
        train_rows = self.rows(self.csv)
        classes = self._classes(train_rows, self.csv)
        train = self._samples(train_rows, classes, self.csv)
        self._report(train)
        test = None
        if self.test_csv is not None:
            test_rows = self.rows(self.test_csv)
            self._classes(test_rows, self.test_csv) if self.declared else None
            extra = sorted({label for _, label, _ in test_rows} - set(classes))
            if extra:
                raise LabError(f"data.test_csv={self.test_csv} has label(s) {extra} that data.csv={self.csv} "
                               f"does not: the classes are {classes}.")
            test = self._samples(test_rows, classes, self.test_csv)
            self._report(test)
        return Loaded(self._decode_all(train.samples, size, channels),
                      self._decode_all(test.samples, size, channels) if test is not None else None, classes)
