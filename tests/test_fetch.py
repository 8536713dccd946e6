"""`lab data fetch`: generated archives and idx files served over loopback HTTP, fetched into tmp folders."""
import argparse
import dataclasses
import hashlib
import io
import os
import socket
import subprocess
import sys
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lab.data import fetch
from lab.data.folder import ImageFolder
from lab.data.idx import MNIST, FashionMNIST
from lab.errors import LabError

FLOWERS = ("daisy", "dandelion", "roses", "sunflowers", "tulips")


def run_fetch(*argv: str) -> None:
    parser = argparse.ArgumentParser(prog="lab")
    fetch.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "fetch", *argv])
    fetch.data_command(args)


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


def tgz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def flowers_tgz() -> bytes:
    members = {f"flower_photos/{c}/{i}.jpg": jpeg(10 * k + i) for k, c in enumerate(FLOWERS) for i in range(4)}
    return tgz({"flower_photos/LICENSE.txt": b"CC-BY 2.0\n", **members})


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        body = srv.files.get(self.path)
        if body is None:
            return self.send_error(404)
        start, wanted = 0, self.headers.get("Range")
        if wanted and srv.ranges:
            start = int(wanted.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                return self.end_headers()
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        cut = srv.cut_after.pop(self.path, None)  # once: the next request gets the whole rest
        self.wfile.write(body[start:cut] if cut else body[start:])
        if cut:
            self.close_connection = True  # fewer bytes than Content-Length promised

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.requests, srv.cut_after, srv.ranges = {}, [], {}, True
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") or p.suffix in (".partial", ".tgz"))


def folder_dm(root: Path, tmp_path: Path) -> ImageFolder:
    dm = ImageFolder(root=str(root), image_size=16, batch_size=4, cache_dir=str(tmp_path / "cache"))
    dm.setup()
    return dm


def test_flowers_extracts_to_an_image_folder_and_is_idempotent(server, tmp_path, capsys):
    data = flowers_tgz()
    server.files["/flower_photos.tgz"] = data
    root = tmp_path / "data"
    run_fetch("flowers", "--root", str(root), "--url", server.url + "/flower_photos.tgz", "--sha256", sha256(data))

    target = root / "flower_photos"
    assert sorted(p.name for p in target.iterdir()) == ["LICENSE.txt", *FLOWERS]
    assert all(len(list((target / c).glob("*.jpg"))) == 4 for c in FLOWERS)
    assert leftovers(root) == []  # no archive, .partial or temporary folder left behind
    dm = folder_dm(target, tmp_path)
    assert dm.class_names == list(FLOWERS) and dm.shape == (3, 16, 16)
    assert f"ready in {target}" in capsys.readouterr().out

    run_fetch("flowers", "--root", str(root), "--url", server.url + "/flower_photos.tgz")
    assert len(server.requests) == 1 and "already there" in capsys.readouterr().err

    (target / "daisy" / "0.jpg").unlink()
    run_fetch("flowers", "--root", str(root), "--url", server.url + "/flower_photos.tgz", "--force", "--skip-checksum")
    assert (target / "daisy" / "0.jpg").is_file() and len(server.requests) == 2
    assert "SHA-256 check of flower_photos.tgz is skipped" in capsys.readouterr().err


def test_file_url_and_archive_put_in_root_by_hand(tmp_path):
    data = flowers_tgz()
    elsewhere = tmp_path / "elsewhere" / "flower_photos.tgz"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(data)
    run_fetch("flowers", "--root", str(tmp_path / "a"), "--url", elsewhere.as_uri(), "--sha256", sha256(data))
    assert (tmp_path / "a" / "flower_photos" / "roses" / "0.jpg").is_file()

    # No --url: an archive already in ROOT is used, checked against the pinned SHA-256, and kept.
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "flower_photos.tgz").write_bytes(data)
    with pytest.raises(LabError, match=f"expected {fetch.DATASETS['flowers'].sha256}, got {sha256(data)}"):
        run_fetch("flowers", "--root", str(tmp_path / "b"))
    assert (tmp_path / "b" / "flower_photos.tgz").is_file() and not (tmp_path / "b" / "flower_photos").exists()
    run_fetch("flowers", "--root", str(tmp_path / "b"), "--sha256", sha256(data))
    assert (tmp_path / "b" / "flower_photos" / "tulips" / "3.jpg").is_file()


def test_checksum_mismatch_extracts_nothing(server, tmp_path):
    data = flowers_tgz()
    server.files["/flower_photos.tgz"] = data
    root = tmp_path / "data"
    with pytest.raises(LabError) as err:
        run_fetch("flowers", "--root", str(root), "--url", server.url + "/flower_photos.tgz", "--sha256", "ab" * 32)
    assert f"expected {'ab' * 32}, got {sha256(data)}" in str(err.value)
    assert list(root.iterdir()) == []  # downloaded file deleted, nothing extracted


def test_cats_dogs_moves_unreadable_images_aside(server, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for cls in ("Cat", "Dog"):
            for i in range(5):
                z.writestr(f"PetImages/{cls}/{i}.jpg", jpeg(i + (cls == "Dog") * 100))
        z.writestr("PetImages/Cat/666.jpg", b"")  # the real archive has 0-byte and broken files
        z.writestr("PetImages/Dog/11702.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")
        z.writestr("PetImages/Dog/Thumbs.db", b"windows thumbnail cache")
        z.writestr("readme[1].txt", b"Kaggle cats and dogs\n")
    server.files["/pets.zip"] = buf.getvalue()
    root = tmp_path / "data"
    run_fetch("cats_dogs", "--root", str(root), "--url", server.url + "/pets.zip", "--sha256", sha256(buf.getvalue()))

    target, rejected = root / "cats_dogs", root / "cats_dogs_rejected"
    assert sorted(p.name for p in target.iterdir()) == ["Cat", "Dog", "readme[1].txt"]
    assert sorted(p.name for p in (target / "Cat").iterdir()) == [f"{i}.jpg" for i in range(5)]
    assert (rejected / "Cat" / "666.jpg").is_file() and (rejected / "Dog" / "11702.jpg").is_file()
    listing = (rejected / "REJECTED.txt").read_text()
    assert "Cat/666.jpg\t0 bytes" in listing and "Dog/11702.jpg" in listing
    dm = folder_dm(target, tmp_path)
    assert dm.class_names == ["Cat", "Dog"] and dm.skipped == []


def test_interrupted_download_resumes_with_range(server, tmp_path, capsys):
    data = flowers_tgz()
    server.files["/flower_photos.tgz"] = data
    server.cut_after["/flower_photos.tgz"] = len(data) // 3
    root = tmp_path / "data"
    run_fetch("flowers", "--root", str(root), "--url", server.url + "/flower_photos.tgz", "--sha256", sha256(data))
    assert server.requests == [("/flower_photos.tgz", None), ("/flower_photos.tgz", f"bytes={len(data) // 3}-")]
    assert "resuming" in capsys.readouterr().err
    assert (root / "flower_photos" / "sunflowers" / "2.jpg").is_file()


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "no-range"])
def test_partial_file_from_an_earlier_run(server, tmp_path, ranges):
    data = flowers_tgz()
    server.files["/flower_photos.tgz"], server.ranges = data, ranges
    root = tmp_path / "data"
    root.mkdir()
    # With Range support the partial file is a true prefix; without it, junk that must be thrown away.
    (root / "flower_photos.tgz.partial").write_bytes(data[:1000] if ranges else b"junk" * 250)
    run_fetch("flowers", "--root", str(root), "--url", server.url + "/flower_photos.tgz", "--sha256", sha256(data))
    assert server.requests == [("/flower_photos.tgz", "bytes=1000-")]
    assert (root / "flower_photos" / "daisy" / "1.jpg").is_file() and leftovers(root) == []


def evil_tgz(kind: str, outside: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("flower_photos/daisy/0.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
        if kind == "symlink":
            info = tarfile.TarInfo("flower_photos/daisy/link.jpg")
            info.type, info.linkname = tarfile.SYMTYPE, str(outside)
            tar.addfile(info)
        else:
            info = tarfile.TarInfo("flower_photos/../../evil" if kind == "dotdot" else str(outside))
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_unsafe_tar_is_rejected(server, tmp_path, kind):
    outside = tmp_path / "evil"
    data = evil_tgz(kind, outside)
    server.files["/flower_photos.tgz"] = data
    root = tmp_path / "data"
    with pytest.raises(LabError, match="unsafe member"):
        run_fetch("flowers", "--root", str(root), "--url", server.url + "/flower_photos.tgz", "--sha256", sha256(data))
    assert not outside.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert list(root.iterdir()) == []


def test_unsafe_zip_is_rejected(server, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("PetImages/Cat/0.jpg", jpeg(0))
        z.writestr("PetImages/../../evil", b"evil")
    server.files["/pets.zip"] = buf.getvalue()
    root = tmp_path / "data"
    with pytest.raises(LabError, match="unsafe member 'PetImages/../../evil'"):
        run_fetch("cats_dogs", "--root", str(root), "--url", server.url + "/pets.zip", "--skip-checksum")
    assert not (tmp_path / "evil").exists() and list(root.iterdir()) == []


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_network_says_where_to_put_the_archive(tmp_path):
    root = tmp_path / "data"
    with pytest.raises(LabError) as err:
        run_fetch("flowers", "--root", str(root), "--url", f"http://127.0.0.1:{closed_port()}/flower_photos.tgz")
    message = str(err.value)
    assert "Could not download" in message and "Connection refused" in message
    assert f"put flower_photos.tgz in {root}/ and rerun, or pass --url file:///path/flower_photos.tgz" in message
    assert not (root / "flower_photos").exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full (every write: ENOSPC)")
def test_a_full_disk_is_said_and_not_retried(server, tmp_path):
    data = flowers_tgz()
    server.files["/flower_photos.tgz"] = data
    root = tmp_path / "data"
    root.mkdir()
    (root / "flower_photos.tgz.partial").symlink_to("/dev/full")
    with pytest.raises(LabError, match=f"The disk holding {root} is full after 0.0 MB of {server.url}/flower_photos.tgz:"
                                       " free some space and rerun.$"):
        run_fetch("flowers", "--root", str(root), "--url", server.url + "/flower_photos.tgz", "--sha256", sha256(data))
    assert len(server.requests) == 1 and not (root / "flower_photos").exists()


def test_http_error_is_a_lab_error(server, tmp_path):
    with pytest.raises(LabError, match="HTTP 404"):
        run_fetch("flowers", "--root", str(tmp_path), "--url", server.url + "/missing.tgz")


def test_mnist_files_load_with_the_idx_datamodule(server, tmp_path, capsys, idx_dataset):
    mirror = idx_dataset(tmp_path / "mirror")
    for f in mirror.iterdir():
        server.files[f"/mirror/{f.name}"] = f.read_bytes()
    root = tmp_path / "data"
    run_fetch("mnist", "--root", str(root), "--url", server.url + "/mirror/", "--skip-checksum")
    assert sorted(p.name for p in (root / "mnist").iterdir()) == sorted(fetch.DATASETS["mnist"].md5)
    assert "MD5 check is skipped" in capsys.readouterr().err
    dm = MNIST(root=str(root / "mnist"), download=False, batch_size=8)
    dm.setup()
    assert dm.shape == (1, 28, 28) and dm.num_classes == 10

    run_fetch("mnist", "--root", str(root), "--url", server.url + "/mirror/")
    assert len(server.requests) == 4 and "already holds" in capsys.readouterr().err


def test_truncated_idx_file_is_rejected_and_removed(server, tmp_path, idx_dataset):
    mirror = idx_dataset(tmp_path / "mirror")
    for f in mirror.iterdir():
        server.files[f"/{f.name}"] = f.read_bytes()
    server.files["/train-images-idx3-ubyte.gz"] = server.files["/train-images-idx3-ubyte.gz"][:-50]
    root = tmp_path / "data"
    with pytest.raises(LabError, match="train-images-idx3-ubyte.gz is not a complete gzip file"):
        run_fetch("mnist", "--root", str(root), "--url", server.url, "--skip-checksum")
    assert not (root / "mnist" / "train-images-idx3-ubyte.gz").exists()


def test_fashion_mnist_in_a_system_folder_needs_no_download(tmp_path, monkeypatch, capsys, idx_dataset):
    system = idx_dataset(tmp_path / "system")
    assert FashionMNIST.SYSTEM_DIRS == fetch.DATASETS["fashion_mnist"].system_dirs  # the datamodule reads them too
    spec = dataclasses.replace(fetch.DATASETS["fashion_mnist"], system_dirs=(str(system),))
    monkeypatch.setitem(fetch.DATASETS, "fashion_mnist", spec)
    run_fetch("fashion_mnist", "--root", str(tmp_path / "data"))
    assert "no download needed" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_sha256_is_refused_for_idx_datasets(tmp_path):
    with pytest.raises(LabError, match="--sha256 applies to one archive"):
        run_fetch("mnist", "--root", str(tmp_path), "--sha256", "00" * 32)


# -- a mirror is checked like the canonical URL; what is extracted must look like the dataset -------------

def lab_fetch(*argv: str) -> subprocess.CompletedProcess:
    """The real `lab data fetch` command, in a child process."""
    return subprocess.run([sys.executable, "-m", "lab.cli", "data", "fetch", *argv], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.mark.slow  # the real `lab data fetch` in a child process
@pytest.mark.parametrize("body", ["random", "other_archive"])
def test_mirror_is_checked_against_the_pinned_sha256(server, tmp_path, body):
    # Random bytes, or a well-formed archive that is not the pinned file: refused either way by default.
    data = np.random.default_rng(1).bytes(5000) if body == "random" else flowers_tgz()
    server.files["/flower_photos.tgz"] = data
    root = tmp_path / "data"
    proc = lab_fetch("flowers", "--root", str(root), "--url", server.url + "/flower_photos.tgz")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "ready" not in proc.stdout
    assert "lab: error:" in proc.stderr
    assert f"expected {fetch.DATASETS['flowers'].sha256}, got {sha256(data)}" in proc.stderr
    assert "--skip-checksum" in proc.stderr and "deleted" in proc.stderr
    assert list(root.iterdir()) == []  # no archive, .partial or half-extracted folder


def test_skip_checksum_is_explicit_and_still_fetches_a_mirror(server, tmp_path, capsys):
    data = flowers_tgz()
    server.files["/flower_photos.tgz"] = data
    root = tmp_path / "data"
    run_fetch("flowers", "--root", str(root), "--url", server.url + "/flower_photos.tgz", "--skip-checksum")
    out, err = capsys.readouterr()
    assert "SHA-256 check of flower_photos.tgz is skipped" in err and "ready in" in out
    assert sorted(p.name for p in (root / "flower_photos").iterdir()) == ["LICENSE.txt", *FLOWERS]
    assert leftovers(root) == []


def test_sha256_and_skip_checksum_contradict(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_fetch("flowers", "--root", str(tmp_path), "--sha256", "00" * 32, "--skip-checksum")
    assert exit_.value.code == 2 and "not allowed with" in capsys.readouterr().err


def one_class_of_random_bytes() -> bytes:
    rng = np.random.default_rng(2)
    return tgz({f"flower_photos/daisy/{i}.jpg": rng.bytes(3000) for i in range(3)})


@pytest.mark.slow  # the real `lab data fetch` in a child process
def test_wrong_layout_is_refused_and_nothing_is_left(server, tmp_path):
    data = one_class_of_random_bytes()
    server.files["/flower_photos.tgz"] = data
    root = tmp_path / "data"
    # The checksum override matches: only the layout check stands between this and "ready".
    proc = lab_fetch("flowers", "--root", str(root), "--url", server.url + "/flower_photos.tgz",
                     "--sha256", sha256(data))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "ready" not in proc.stdout
    assert "does not hold the flower_photos dataset" in proc.stderr
    assert "dandelion, roses, sunflowers, tulips are missing" in proc.stderr
    assert "no readable image in daisy/" in proc.stderr
    assert list(root.iterdir()) == []  # archive deleted, temporary folder removed, no flower_photos/


def test_a_class_without_a_decodable_image_is_refused(server, tmp_path):
    members = {f"flower_photos/{c}/{i}.jpg": jpeg(10 * k + i) for k, c in enumerate(FLOWERS) for i in range(2)}
    members.update({"flower_photos/tulips/0.jpg": b"\xff\xd8\xff not a jpeg", "flower_photos/tulips/1.jpg": b""})
    data = tgz(members)
    server.files["/flower_photos.tgz"] = data
    root = tmp_path / "data"
    with pytest.raises(LabError, match=r"no readable image in tulips/ \(2 image file\(s\), none decodable\)"):
        run_fetch("flowers", "--root", str(root), "--url", server.url + "/flower_photos.tgz", "--skip-checksum")
    assert list(root.iterdir()) == []


def test_wrong_layout_keeps_the_dataset_already_there(server, tmp_path):
    good, bad = flowers_tgz(), one_class_of_random_bytes()
    server.files["/good.tgz"], server.files["/bad.tgz"] = good, bad
    root = tmp_path / "data"
    run_fetch("flowers", "--root", str(root), "--url", server.url + "/good.tgz", "--sha256", sha256(good))
    with pytest.raises(LabError, match="does not hold the flower_photos dataset"):
        run_fetch("flowers", "--root", str(root), "--url", server.url + "/bad.tgz", "--skip-checksum", "--force")
    assert sorted(p.name for p in root.iterdir()) == ["flower_photos"]
    assert all(len(list((root / "flower_photos" / c).glob("*.jpg"))) == 4 for c in FLOWERS)


def test_cats_dogs_without_dogs_is_refused_and_leaves_no_rejected_folder(server, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("PetImages/Cat/0.jpg", jpeg(0))
        z.writestr("PetImages/Cat/1.jpg", b"broken")  # would be moved to cats_dogs_rejected/
    server.files["/pets.zip"] = buf.getvalue()
    root = tmp_path / "data"
    with pytest.raises(LabError, match=r"class folder\(s\) Dog are missing \(it has \['Cat'\]\)"):
        run_fetch("cats_dogs", "--root", str(root), "--url", server.url + "/pets.zip", "--skip-checksum")
    assert list(root.iterdir()) == []


def test_archive_put_in_root_by_hand_with_wrong_layout_is_kept(tmp_path):
    data = one_class_of_random_bytes()
    root = tmp_path / "data"
    root.mkdir()
    (root / "flower_photos.tgz").write_bytes(data)
    with pytest.raises(LabError, match="does not hold the flower_photos dataset"):
        run_fetch("flowers", "--root", str(root), "--sha256", sha256(data))
    assert sorted(p.name for p in root.iterdir()) == ["flower_photos.tgz"]  # the user's file, nothing else


@pytest.mark.slow  # the real `lab data fetch` in a child process
def test_mnist_mirror_is_checked_against_the_pinned_md5(server, tmp_path, idx_dataset):
    mirror = idx_dataset(tmp_path / "mirror")  # well-formed idx files, but not the pinned ones
    for f in mirror.iterdir():
        server.files[f"/mirror/{f.name}"] = f.read_bytes()
    root = tmp_path / "data"
    proc = lab_fetch("mnist", "--root", str(root), "--url", server.url + "/mirror/")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "ready" not in proc.stdout
    name = "train-images-idx3-ubyte.gz"
    got = hashlib.md5((mirror / name).read_bytes()).hexdigest()
    assert f"MD5 expected {fetch.DATASETS['mnist'].md5[name]} (pinned), got {got}" in proc.stderr
    assert "--skip-checksum" in proc.stderr
    assert list(root.iterdir()) == []  # no .partial, no empty mnist/ folder
