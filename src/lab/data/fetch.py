"""`lab data fetch NAME`: download a dataset into the layout lab's datamodules read (LAYOUTS).

Downloads go to ROOT/FILE.partial and resume with an HTTP Range request; archives are checked (SHA-256)
before extraction and extracted into a temporary folder that is renamed into place once it holds the
dataset's class folders, each with at least one image that decodes. A mirror (--url) is checked against
the same pinned checksums unless --skip-checksum says otherwise; whatever fails a check is deleted.
Only the standard library is imported at module level: `lab --help` must not pay for torch.
"""
import argparse
import errno
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError
from urllib.request import Request, urlopen

from lab.data import cache
from lab.errors import LabError

LAYOUTS = """\
datasets, where they land, and the overrides that train on them:
  flowers        ROOT/flower_photos/<class>/*.jpg    data=image_folder data.root=ROOT/flower_photos
  cats_dogs      ROOT/cats_dogs/{Cat,Dog}/*.jpg      data=image_folder data.root=ROOT/cats_dogs
                 (unreadable images are moved to ROOT/cats_dogs_rejected/, listed in REJECTED.txt)
  mnist          ROOT/mnist/*-ubyte.gz               data=mnist data.root=ROOT/mnist
  fashion_mnist  ROOT/fashion_mnist/*-ubyte.gz       data=fashion_mnist data.root=ROOT/fashion_mnist
                 (nothing to download when /usr/share/datasets/fashion-mnist has the files)
"""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
CHUNK = 1 << 16
TIMEOUT_S = 30
ATTEMPTS = 5  # per file; a new attempt is made only when the previous one received bytes


@dataclass(frozen=True)
class Archive:
    url: str
    size: int
    sha256: str
    top: str  # the archive's folder that becomes ROOT/<target>
    target: str
    classes: tuple[str, ...]  # class folders under `top`, each must hold at least one decodable image
    reject_unreadable: bool = False

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class IdxFiles:
    url: str  # folder holding the four files
    target: str
    system_dirs: tuple[str, ...]  # where a system package installs the files; lab.data.idx reads them there too
    md5: dict[str, str]  # file name -> MD5 of the canonical file


FULL = (errno.ENOSPC, errno.EDQUOT)  # a full disk, a full quota: writing again will not help

# The four files of an MNIST-format dataset, in the order the MD5s below are given.
IDX_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz")

DATASETS = {
    "flowers": Archive(
        url="http://download.tensorflow.org/example_images/flower_photos.tgz", size=228_813_984,
        sha256="4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c",
        top="flower_photos", target="flower_photos",
        classes=("daisy", "dandelion", "roses", "sunflowers", "tulips")),
    "cats_dogs": Archive(
        url="https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/"
            "kagglecatsanddogs_3367a.zip", size=824_894_548,
        sha256="f9553e426bd725354ed3a27e3c6920caadb55c835d1ebd880d2e56d3f1fbb22b",
        top="PetImages", target="cats_dogs", classes=("Cat", "Dog"), reject_unreadable=True),
    # MD5s of the original .gz files, as torchvision's MNIST/FashionMNIST classes pin them. Debian's
    # dataset-fashion-mnist package re-gzips the files, so its copies have other MD5s (same content).
    "mnist": IdxFiles(
        url="https://ossci-datasets.s3.amazonaws.com/mnist/", target="mnist", system_dirs=("/usr/share/datasets/mnist",),
        md5=dict(zip(IDX_NAMES, ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                                 "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c")))),
    "fashion_mnist": IdxFiles(
        url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", target="fashion_mnist",
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        md5=dict(zip(IDX_NAMES, ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                                 "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310")))),
}


def add_parser(subparsers) -> None:
    data = subparsers.add_parser("data", help="download datasets, list or clear the decoded-folder cache")
    sub = data.add_subparsers(dest="data_command", metavar="{fetch,cache}", required=True)
    cached = sub.add_parser("cache", help="list the decoded image folders cached on this machine (--clear removes "
                                          "them)")
    cached.add_argument("--dir", default=cache.DEFAULT_DIR, help=f"the cache folder (data.cache_dir; default "
                                                                 f"{cache.DEFAULT_DIR})")
    cached.add_argument("--clear", action="store_true", help="remove every entry (running trains keep theirs)")
    fetch = sub.add_parser("fetch", help="download a dataset into ROOT in the layout its datamodule reads",
                           epilog=LAYOUTS, formatter_class=argparse.RawDescriptionHelpFormatter)
    fetch.add_argument("name", choices=list(DATASETS))
    fetch.add_argument("--root", default="data", help="folder that receives the dataset (default: data)")
    fetch.add_argument("--url", default=None,
                       help="download from here instead: a mirror, file:///path or http://127.0.0.1:PORT/...; "
                            "for mnist/fashion_mnist the folder holding the four .gz files")
    check = fetch.add_mutually_exclusive_group()
    check.add_argument("--sha256", default=None, metavar="HEX",
                       help="expected SHA-256 of the archive, instead of the pinned one (flowers, cats_dogs)")
    check.add_argument("--skip-checksum", action="store_true",
                       help="do not check the pinned checksum (SHA-256 of the archive, MD5 of idx files), "
                            "e.g. for a mirror that serves a re-packed copy; the extracted files are still "
                            "checked (class folders with decodable images, complete idx files)")
    fetch.add_argument("--force", action="store_true", help="fetch again even when the dataset is already there")


def data_command(args) -> None:
    if args.data_command == "cache":
        return cache.command(args)
    spec, root = DATASETS[args.name], Path(args.root).expanduser()
    skip = getattr(args, "skip_checksum", False)
    if isinstance(spec, Archive):
        where = fetch_archive(spec, root, args.url, args.sha256, args.force, skip)
    else:
        if args.sha256:
            raise LabError(f"--sha256 applies to one archive; {args.name} is four files, checked by their "
                           "pinned MD5s (--skip-checksum skips that) and by their idx format.")
        where = fetch_idx(spec, root / spec.target, args.url, args.force, skip)
    print(f"{args.name}: ready in {where}")


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- downloading ----------------------------------------------------------------------------------

class Progress:
    """tqdm's bar on a terminal; a plain line per 10% when stderr is a file or pipe (a log, a sweep worker's)."""

    def __init__(self, label: str, done: int, total: int | None):
        from tqdm import tqdm  # lazily: `lab --help` imports this module

        self.label, self.done, self.total = label, done, total
        self.start_done, self.start, self.step = done, time.monotonic(), -1
        self.bar = tqdm(total=total, initial=done, desc=label, unit="B", unit_scale=True, disable=None)
        self.log = bool(self.bar.disable)  # tqdm: None on a terminal, True elsewhere (and after close)

    def add(self, n: int) -> None:
        self.done += n
        self.bar.update(n)
        if self.log and self.total and self.done * 10 // self.total > self.step:
            self.step = self.done * 10 // self.total
            self._line()

    def close(self) -> None:
        self.bar.close()
        if self.log and self.step < 10:  # a log already got its 100% line
            self._line()

    def _line(self) -> None:
        mb, rate = self.done / 1e6, (self.done - self.start_done) / 1e6 / max(time.monotonic() - self.start, 1e-3)
        pct = f"{100 * self.done / self.total:3.0f}% " if self.total else ""
        size = f"{mb:.1f}/{self.total / 1e6:.1f} MB" if self.total else f"{mb:.1f} MB"
        note(f"{self.label}: {pct}{size} {rate:.1f} MB/s")


def download(url: str, partial: Path) -> None:
    """Fill `partial` with the resource at url, resuming what an earlier attempt or run left there."""
    for attempt in range(1, ATTEMPTS + 1):
        before = partial.stat().st_size if partial.exists() else 0
        try:
            return _transfer(url, partial)
        except HTTPError:
            raise
        except (OSError, http.client.HTTPException) as err:  # refused, reset, timeout, IncompleteRead
            got = partial.stat().st_size if partial.exists() else 0
            if got <= before or attempt == ATTEMPTS or getattr(err, "errno", None) in FULL:
                raise
            note(f"{partial.name}: connection lost at {got / 1e6:.1f} MB ({err!r}); resuming")


def _transfer(url: str, partial: Path) -> None:
    have = partial.stat().st_size if partial.exists() else 0
    try:
        response = urlopen(Request(url, headers={"Range": f"bytes={have}-"} if have else {}), timeout=TIMEOUT_S)
    except HTTPError as err:
        if err.code != 416 or not have:
            raise
        partial.unlink()  # the partial file is not a prefix of this resource: start over
        return _transfer(url, partial)
    with response:
        if have and not (response.status == 206
                         and response.headers.get("Content-Range", "").startswith(f"bytes {have}-")):
            have = 0  # the server ignored the Range request (or file://): download from the start
        length = response.headers.get("Content-Length")
        bar = Progress(partial.name.removesuffix(".partial"), have, have + int(length) if length else None)
        try:
            with open(partial, "ab" if have else "wb") as out:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    bar.add(len(chunk))
            if bar.total is not None and bar.done < bar.total:
                # read(n) returns b"" when the server hangs up early instead of raising: say it here
                raise http.client.IncompleteRead(b"", bar.total - bar.done)
        finally:
            bar.close()


def fetch_file(url: str, partial: Path, by_hand: str) -> None:
    try:
        download(url, partial)
    except HTTPError as err:
        raise LabError(f"Downloading {url} failed: the server answered HTTP {err.code} {err.reason}. "
                       f"{by_hand}") from err
    except (OSError, http.client.HTTPException) as err:
        got = partial.stat().st_size if partial.exists() else 0
        kept = f" ({partial} is kept: rerunning resumes it)" if got else ""
        if getattr(err, "errno", None) in FULL:  # a write failed, not the network: no retry either
            raise LabError(f"The disk holding {partial.parent} is full after {got / 1e6:.1f} MB of {url}: free "
                           f"some space and rerun{kept}.") from err
        reason = getattr(err, "reason", None) or err
        raise LabError(f"Could not download {url}: {reason}{kept}. If this machine has no network access, "
                       f"fetch the file elsewhere, then {by_hand}") from err


def file_hash(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# -- archives -------------------------------------------------------------------------------------

def fetch_archive(spec: Archive, root: Path, url: str | None, sha256: str | None, force: bool,
                  skip_checksum: bool = False) -> Path:
    target = root / spec.target
    if target.is_dir() and not force:
        note(f"{target} is already there: nothing to do (--force fetches it again).")
        return target
    root.mkdir(parents=True, exist_ok=True)
    filename = url.rstrip("/").rsplit("/", 1)[-1] if url else spec.filename
    archive, partial = root / filename, root / f"{filename}.partial"
    # A mirror serves the same file, so the pinned checksum applies to it too; only an explicit
    # --skip-checksum turns the check off, and --sha256 replaces the pinned value.
    pinned = not (sha256 or skip_checksum)
    expected = None if skip_checksum else (sha256 or spec.sha256).lower()
    if skip_checksum:
        note(f"warning: --skip-checksum: the SHA-256 check of {filename} is skipped; "
             "the extracted folder is still checked.")
    downloaded = url is not None or not archive.is_file()  # without --url, an archive already in ROOT is used
    if downloaded:
        fetch_file(url or spec.url, partial,
                   f"put {spec.filename} in {root}/ and rerun, or pass --url file:///path/{spec.filename}.")
    source = partial if downloaded else archive
    try:
        if expected is not None:
            got = file_hash(source, "sha256")
            if got != expected:
                size = source.stat().st_size
                sizes = f" ({size} bytes, the canonical file has {spec.size})" if pinned and size != spec.size else ""
                why = (f" The expected value is the SHA-256 pinned for {spec.url}; a mirror should serve the "
                       "same file. If you trust this one anyway, rerun with --skip-checksum to skip the check "
                       "explicitly (or give its digest with --sha256 HEX)." if pinned else "")
                raise LabError(f"{url or spec.url if downloaded else source} is not the expected file: SHA-256 "
                               f"expected {expected}, got {got}{sizes}"
                               + ("; it was deleted." if downloaded else ": replace or delete it.") + why)
        if downloaded:
            source = partial.replace(archive)  # verified: a rerun after a failed extraction reuses it
        extract(source, spec, root)
    except LabError as err:
        if not downloaded:  # a file put in ROOT by hand is the user's
            raise
        source.unlink(missing_ok=True)  # a download that failed a check is junk
        if "was deleted" in str(err):
            raise
        raise LabError(f"{err} The download was deleted.") from err
    if downloaded:
        source.unlink()  # the extracted folder is what lab reads; an archive put there by hand is kept
    return target


def _safe_name(name: str, archive: Path, dest: Path, link: bool) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    if link or path.is_absolute() or ".." in path.parts or not (dest / path).resolve().is_relative_to(dest):
        raise LabError(f"{archive} holds an unsafe member {name!r} (a link or special file, an absolute path "
                       "or '..'): refusing to extract it. Is this the right archive?")


def extract(archive: Path, spec: Archive, root: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.target}-", dir=root)).resolve()
    try:
        note(f"extracting {archive.name} ...")
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    _safe_name(info.filename, archive, tmp, link=(info.external_attr >> 16) & 0o170000 == 0o120000)
                z.extractall(tmp)
        else:
            try:
                with tarfile.open(archive) as tar:
                    members = tar.getmembers()
                    for m in members:
                        _safe_name(m.name, archive, tmp, link=not (m.isfile() or m.isdir()))
                    # the 'data' filter also drops setuid bits and special files; our check above covers
                    # Pythons that predate it (3.11.4)
                    tar.extractall(tmp, members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
            except (tarfile.TarError, EOFError) as err:  # FilterError is a TarError
                raise LabError(f"{archive} is not a readable tar or zip archive ({err}).") from err
        top = tmp / spec.top
        if not top.is_dir():
            raise LabError(f"{archive} has no {spec.top}/ folder (it holds {sorted(p.name for p in tmp.iterdir())}).")
        for extra in tmp.iterdir():  # licence and readme files beside the image folder go along with it
            if extra.is_file() and not (top / extra.name).exists():
                extra.rename(top / extra.name)
        rejected = root / f"{spec.target}_rejected"
        staged = tmp / f".{rejected.name}"  # moved into place only once the dataset is accepted
        if spec.reject_unreadable:
            reject_unreadable(top, staged)
        check_layout(top, spec, archive)
        replace(top, root / spec.target)
        if spec.reject_unreadable:
            shutil.rmtree(rejected, ignore_errors=True)
            if staged.is_dir():
                staged.rename(rejected)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def decodable(path: Path) -> bool:
    from PIL import Image  # lazily: `lab --help` imports this module

    try:
        with Image.open(path) as img:
            img.load()
        return True
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def check_layout(top: Path, spec: Archive, archive: Path) -> None:
    """Refuse a folder that is not the dataset: each expected class folder, with a decodable image."""
    missing, empty = [], []
    for name in spec.classes:
        folder = top / name
        if not folder.is_dir():
            missing.append(name)
            continue
        images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not any(decodable(p) for p in images):
            empty.append(f"{name}/ ({len(images)} image file(s), none decodable)")
    if missing or empty:
        found = sorted(p.name for p in top.iterdir() if p.is_dir())
        problems = ([f"the class folder(s) {', '.join(missing)} are missing (it has {found or 'none'})"]
                    if missing else []) + ([f"no readable image in {', '.join(empty)}"] if empty else [])
        raise LabError(f"{archive.name} does not hold the {spec.target} dataset: {'; '.join(problems)}. "
                       f"Expected {spec.top}/{{{','.join(spec.classes)}}}/ with images in each. Nothing was "
                       "extracted.")


def replace(new: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def reject_unreadable(folder: Path, rejected: Path) -> None:
    # The same decoder the ImageFolder datamodule uses, so what stays is exactly what it can read.
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from lab.data.decode import decode

    images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    note(f"checking {len(images)} images for unreadable files ...")
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        readable = list(pool.map(lambda p: p.stat().st_size > 0 and decode(str(p), 8, 3) is not None, images))
    bad = [p for p, ok in zip(images, readable) if not ok]
    shutil.rmtree(rejected, ignore_errors=True)
    if not bad:
        return
    lines = []
    for path in bad:
        rel = path.relative_to(folder)
        lines.append(f"{rel}\t{path.stat().st_size} bytes")
        (rejected / rel).parent.mkdir(parents=True, exist_ok=True)
        path.rename(rejected / rel)
    (rejected / "REJECTED.txt").write_text(
        "Files moved out of the dataset because they are empty or cannot be decoded as images:\n"
        + "\n".join(lines) + "\n")
    note(f"moved {len(bad)} unreadable image(s) to {rejected} (listed in REJECTED.txt)")


# -- MNIST-format files -----------------------------------------------------------------------------

def fetch_idx(spec: IdxFiles, target: Path, url: str | None, force: bool, skip_checksum: bool = False,
              system_dirs: bool = True) -> Path:
    """The four files into target/, each checked (MD5, idx format). Also what the idx datamodules call when
    their files are missing: one verified download path, not two."""
    from lab.data.idx_file import read_idx  # numpy and torch: not paid by `lab --help`

    if system_dirs and not (force or url):
        for folder in map(Path, spec.system_dirs):
            if all((folder / n).is_file() or (folder / n.removesuffix(".gz")).is_file() for n in spec.md5):
                note(f"{spec.target} is already installed in {folder}, which the datamodule also reads: "
                     "no download needed (--force downloads a copy into ROOT anyway).")
                return folder
    missing = [n for n in spec.md5 if force or not (
        (target / n).is_file() or (target / n.removesuffix(".gz")).is_file())]
    if not missing:
        note(f"{target} already holds the four files: nothing to do (--force fetches them again).")
        return target
    if skip_checksum:
        # A mirror's files need not be byte-identical to the originals (re-gzipped copies differ): the
        # user said so explicitly; each is still checked to be a complete idx file.
        note("warning: --skip-checksum: the MD5 check is skipped; the files are checked as idx files only.")
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    base = (url or spec.url).rstrip("/") + "/"
    try:
        for name in missing:
            dest, partial = target / name, target / f"{name}.partial"
            fetch_file(base + name, partial, f"put the files {list(spec.md5)} in {target}/ and rerun, or pass "
                                             "--url with a folder that holds them (file:///path/ or http://...).")
            if not skip_checksum:
                got = file_hash(partial, "md5")
                if got != spec.md5[name]:
                    partial.unlink()
                    raise LabError(
                        f"{base + name} is not the expected file: MD5 expected {spec.md5[name]} (pinned), got "
                        f"{got}; it was deleted. "
                        + ("If this mirror serves re-packed copies you trust, rerun with --skip-checksum to skip "
                           "the check explicitly (the files are still checked as idx files)." if url
                           else "Rerun to download it again."))
            partial.replace(dest)
            try:
                read_idx(dest)  # the format check; it names the file and what is wrong
            except LabError:
                dest.unlink()
                raise
    finally:
        if created and target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # nothing came of it: leave no empty folder behind
    return target
