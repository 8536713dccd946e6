"""The files an image folder holds, each counted once: one walk that both lists the classes and finds their
images, so that they cannot disagree (torchvision's make_dataset follows links that rglob does not).

Rules, all said in the listing of what was left out: hidden names (.ipynb_checkpoints, .DS_Store) are not
classes and not images; a link is followed only when it resolves inside data.root and does not lead back
into a folder already being walked; a file reached twice (by two links) counts once, under the first class
that reached it; only regular files are images (a FIFO named x.jpg would block the decoder forever).
"""
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from lab.errors import LabError


@dataclass
class Listing:
    classes: list[str]
    samples: list[tuple[str, int]]  # (path as found under the root, class index)
    skipped: list[str] = field(default_factory=list)  # "path: why", for the run's skipped_images.txt
    hidden: list[str] = field(default_factory=list)  # dot-files and dot-folders passed over


def hidden(name: str) -> bool:
    return name.startswith(".")


def image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


class Walk:
    def __init__(self, root: Path):
        self.root = root
        self.real_root = Path(os.path.realpath(root))
        self.seen: set[str] = set()  # real paths of the image files taken
        self.listing = Listing([], [])

    def inside(self, real: str) -> bool:
        return real == str(self.real_root) or real.startswith(str(self.real_root) + os.sep)

    def follow(self, path: Path) -> tuple[str | None, os.stat_result | None]:
        """(real path, its stat) of a link's target, or (None, None) with the reason listed."""
        try:
            real = os.path.realpath(path, strict=True)
            st = os.stat(real)
        except (OSError, RuntimeError) as err:  # dangling, or a loop of links
            why = "link loop" if isinstance(err, RuntimeError) or getattr(err, "errno", 0) == 40 else "dangling link"
            self.listing.skipped.append(f"{path}: {why}")
            return None, None
        if not self.inside(real):
            self.listing.skipped.append(f"{path}: link leaves data.root ({real})")
            return None, None
        return real, st

    def files(self, folder: Path, label: int, walking: tuple[str, ...]) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            self.listing.skipped.append(f"{folder}: unreadable folder ({err.strerror})")
            return
        for entry in entries:
            path = Path(entry.path)
            if hidden(entry.name):
                self.listing.hidden.append(str(path))
                continue
            if entry.is_symlink():
                real, st = self.follow(path)
                if real is None:
                    continue
            else:
                real = os.path.join(walking[-1], entry.name)
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError as err:
                    self.listing.skipped.append(f"{path}: unreadable ({err.strerror})")
                    continue
            if stat.S_ISDIR(st.st_mode):
                if real in walking:
                    self.listing.skipped.append(f"{path}: link loop (back to {real})")
                else:
                    self.files(path, label, (*walking, real))
            elif image_name(entry.name):
                if not stat.S_ISREG(st.st_mode):
                    self.listing.skipped.append(f"{path}: not a regular file")
                elif real not in self.seen:
                    self.seen.add(real)
                    self.listing.samples.append((str(path), label))
                elif entry.is_symlink():
                    self.listing.skipped.append(f"{path}: the same file as another image ({real})")


def scan(root: Path) -> Listing:
    """Classes are the root's visible sub-folders (links to folders inside the root included), sorted."""
    walk = Walk(root)
    candidates = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if hidden(entry.name):
            walk.listing.hidden.append(entry.path)
            continue
        if entry.is_symlink():
            real, st = walk.follow(Path(entry.path))
        else:
            real = os.path.join(str(walk.real_root), entry.name)
            st = entry.stat(follow_symlinks=False)
        if real is not None and stat.S_ISDIR(st.st_mode):
            candidates.append((entry.name, real))
    if not candidates:
        raise LabError(f"data.root={root} holds no class sub-folders: it must hold one sub-folder of images per "
                       "class.")
    walk.listing.classes = [name for name, _ in candidates]
    for label, (name, real) in enumerate(candidates):
        walk.files(root / name, label, (str(walk.real_root), real))
    return walk.listing
