"""Folders as users and adversaries leave them: link loops, links out of the root, FIFOs named .jpg,
decompression bombs, Jupyter's hidden folders. Each image file counts once, nothing blocks, nothing is decoded
past the pixel limit, and every file left out is listed with its reason."""
import logging
import os
import signal
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from lab.data import decode as decoding
from lab.data.folder import ImageFolder
from lab.errors import LabError


def two_classes(tmp_path, per_class=12):
    root = tmp_path / "pets"
    for k, name in enumerate(("cats", "dogs")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (10, 10), (200 * k, 30 + 9 * i, 90)).save(root / name / f"{i}.png")
    return root


def dm_of(root, tmp_path, **kwargs) -> ImageFolder:
    dm = ImageFolder(root=str(root), image_size=8, batch_size=4, cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.setup("fit")
    return dm


def labels(dm) -> dict[str, int]:
    return {os.path.relpath(p, dm.root): int(y) for s in dm.splits.values() for p, y in zip(s.paths, s.y)}


def test_a_link_loop_is_skipped_not_followed(tmp_path):
    root = two_classes(tmp_path)
    os.symlink("..", root / "cats" / "loop")
    dm = dm_of(root, tmp_path)
    got = labels(dm)
    assert len(got) == 24 and sum(got.values()) == 12  # 12 cats (0), 12 dogs (1), nothing twice
    assert not any("loop" in p for p in got)
    assert [s for s in dm.skipped if "loop" in s] == [f"{root / 'cats' / 'loop'}: link loop (back to {root})"]
    # and a sub-folder linking to its own parent
    os.symlink(".", root / "dogs" / "self")
    assert len(labels(dm_of(root, tmp_path))) == 24


def test_links_out_of_the_root_and_dangling_links_are_listed(tmp_path):
    root = two_classes(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.new("RGB", (10, 10)).save(outside / "x.png")
    os.symlink(outside, root / "cats" / "out")
    os.symlink(outside / "x.png", root / "dogs" / "x.png")
    os.symlink(tmp_path / "nothing.png", root / "dogs" / "gone.png")
    os.symlink(root / "cats" / "0.png", root / "dogs" / "twin.png")  # inside: the same file, counted once
    dm = dm_of(root, tmp_path)
    assert len(labels(dm)) == 24
    reasons = sorted(s.split(": ", 1)[1].split(" (")[0] for s in dm.skipped)
    assert reasons == ["dangling link", "link leaves data.root", "link leaves data.root",
                       "the same file as another image"]


def test_a_linked_class_folder_inside_the_root_is_a_class(tmp_path):
    root = two_classes(tmp_path)
    store = root / ".store"  # hidden: not a class by itself
    (store / "birds").mkdir(parents=True)
    for i in range(5):
        Image.new("RGB", (10, 10), (5, 5, 25 * i)).save(store / "birds" / f"{i}.png")
    os.symlink(store / "birds", root / "birds")
    dm = dm_of(root, tmp_path)
    assert dm.class_names == ["birds", "cats", "dogs"] and len(labels(dm)) == 29


def test_a_fifo_named_jpg_is_not_opened(tmp_path):
    root = two_classes(tmp_path)
    os.mkfifo(root / "cats" / "pipe.jpg")
    dm = dm_of(root, tmp_path)  # would block forever if the FIFO were opened
    assert dm.skipped == [f"{root / 'cats' / 'pipe.jpg'}: not a regular file"]


def png_bomb(path, side: int) -> None:
    """A real PNG declaring side x side grey pixels, all zero: ~side^2/1000 bytes on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + pixels
    body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    root = two_classes(tmp_path)
    bomb = root / "dogs" / "bomb.png"
    png_bomb(bomb, 10_000)  # 100 MP declared, ~100 KB on disk
    assert bomb.stat().st_size < 500_000
    dm = dm_of(root, tmp_path)
    assert dm.skipped == [f"{bomb}: 10000 x 10000 pixels is over data.max_pixels=64000000"]
    with pytest.raises(LabError, match="none of the 25 images could be decoded"):
        dm_of(root, tmp_path, max_pixels=50)  # a 10x10 image is 100 pixels: every image is over it


def test_hidden_files_and_folders_are_passed_over_and_said_once(tmp_path, caplog):
    root = two_classes(tmp_path)
    for where in (root, root / "cats"):
        (where / ".ipynb_checkpoints").mkdir()
        Image.new("RGB", (10, 10)).save(where / ".ipynb_checkpoints" / "copy.png")
    (root / "dogs" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "dogs" / "._0.png").write_bytes(b"AppleDouble")
    with caplog.at_level(logging.WARNING, logger="lab.data.folder"):
        dm = dm_of(root, tmp_path)
    assert dm.class_names == ["cats", "dogs"] and len(labels(dm)) == 24 and dm.skipped == []
    said = [r.getMessage() for r in caplog.records if "hidden" in r.getMessage()]
    assert len(said) == 1 and "passed over 4 hidden" in said[0]


@pytest.mark.slow
def test_lab_train_on_a_looping_folder_trains_on_each_file_once(tmp_path, lab):
    root = two_classes(tmp_path)
    os.symlink("..", root / "cats" / "loop")
    os.mkfifo(root / "dogs" / "pipe.jpg")
    done = lab("train", "data=image_folder", f"data.root={root}", "data.image_size=8", "model=mlp",
               "trainer.max_epochs=1", f"data.cache_dir={tmp_path / 'cache'}", "data.batch_size=4", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("lab").experiment_id])
    profile = run.inputs.dataset_inputs[0].dataset.profile
    import json

    sizes = json.loads(profile)
    assert sizes["train_images"] + sizes["val_images"] + sizes["test_images"] == 24
    listed = client.download_artifacts(run.info.run_id, "skipped_images.txt", str(tmp_path))
    text = Path(listed).read_text()
    assert "cats/loop: link loop" in text and "dogs/pipe.jpg: not a regular file" in text


@pytest.mark.slow
def test_sigterm_ends_lab_train_while_it_decodes(tmp_path, start_lab):
    from torchvision.io import write_jpeg

    root = tmp_path / "big"
    g = torch.Generator().manual_seed(0)
    for i in range(1500):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        img = torch.nn.functional.interpolate(torch.rand(1, 3, 20, 20, generator=g), size=(320, 320))
        write_jpeg((img[0] * 255).to(torch.uint8), str(root / f"c{i % 2}" / f"{i}.jpg"))
    cache = tmp_path / "cache"
    proc = start_lab("train", "data=image_folder", f"data.root={root}", "data.image_size=64", "model=linear",
                     "data.decode_threads=1", f"data.cache_dir={cache}")
    deadline = time.monotonic() + 120
    while not list(cache.glob("*.tmp")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert list(cache.glob("*.tmp")), "decoding never started"
    proc.send_signal(signal.SIGTERM)
    try:
        out = proc.communicate(timeout=20)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("SIGTERM did not end lab train while it was decoding")
    assert proc.returncode == 130 and "lab: interrupted by SIGTERM" in out and "Traceback" not in out, out[-2000:]
    assert not list(cache.glob("*.tmp")) and not list(cache.glob("*.u8"))  # nothing half-written is kept


def test_a_decode_in_a_sweep_worker_must_get_through_files(tmp_path, monkeypatch):
    """While a folder decodes, a sweep worker's pulse beats only as files get decoded (a read stuck on a dead
    network share goes quiet and the parent kills the worker, as for a stuck training loop)."""
    from lab.sweep import liveness, objective  # noqa: F401 - registers the worker's decode listener

    pulse = liveness.Pulse(tmp_path / "w.beat", every_s=60)
    monkeypatch.setattr(liveness, "current", pulse)
    seen = []
    monkeypatch.setattr(decoding, "listeners",
                        [*decoding.listeners, lambda e: seen.append((e, pulse.training, pulse.progress))])
    root = two_classes(tmp_path)
    dm_of(root, tmp_path)
    assert [e for e, _, _ in seen] == ["start"] + ["image"] * 24 + ["end"]
    assert all(training for e, training, _ in seen[:-1]) and not seen[-1][1]
    assert seen[-2][2] > seen[1][2]  # each decoded file counts as progress
