"""Data at real sizes: one store per load (splits are indices), a decoded cache every process maps, bounded
conversions, and streamed batches that equal resident ones."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from lab.config import load
from lab.data import base, cache
from lab.data.base import channel_stats
from lab.data.batches import IndexBatches, StreamedBatches
from lab.data.csv_folder import ImageCSV
from lab.data.folder import ImageFolder
from lab.data.synthetic import Synthetic
from lab.errors import LabError


def folder_dm(root, tmp_path, **kwargs) -> ImageFolder:
    return ImageFolder(root=str(root), **{"image_size": 16, "batch_size": 4, "cache_dir": str(tmp_path / "cache"),
                                          **kwargs})


# -- one store, bounded conversions --------------------------------------------------------------------
def test_splits_are_rows_of_one_mapped_store(tmp_path, image_folder):
    dm = folder_dm(image_folder(per_class=10), tmp_path)
    dm.setup("fit")
    stores = {id(s.store) for s in dm.splits.values()}
    assert len(stores) == 1 and dm.nbytes == 30 * 3 * 16 * 16
    (entry,) = list((tmp_path / "cache").glob("*.u8"))
    with open("/proc/self/maps") as f:
        assert str(entry) in f.read()  # mapped, not read into the process
    index = torch.cat([s.index for s in dm.splits.values()])
    assert sorted(index.tolist()) == list(range(30))


def test_chunked_statistics_equal_a_float_copy(monkeypatch):
    monkeypatch.setattr(base, "CHUNK_BYTES", 300)  # ~1 image a chunk
    dm = Synthetic(n_train=200, n_test=20, size=10, in_channels=3, batch_size=8)
    dm.setup("fit")
    x = dm.splits["train"].x.float() / 255
    assert torch.allclose(dm.mean, x.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(dm.std, x.std(dim=(0, 2, 3)), atol=1e-6)
    mean, _ = channel_stats(dm.splits["train"], limit=5)
    assert torch.allclose(mean, x[:5].mean(dim=(0, 2, 3)), atol=1e-6)


def test_chunked_resize_and_luma_equal_one_pass(monkeypatch):
    x = torch.randint(0, 256, (9, 3, 12, 12), dtype=torch.uint8)
    whole = F.interpolate(x.float(), size=(5, 5), mode="bilinear", antialias=True).round().clamp(0, 255).to(torch.uint8)
    grey = (x.float() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True).round().to(torch.uint8)
    monkeypatch.setattr(base, "CHUNK_BYTES", 1000)
    assert torch.equal(base.resize(x, 5), whole)
    assert torch.equal(base.to_channels(x, 1), grey)


# -- resident and streamed batches ----------------------------------------------------------------------
def test_streamed_batches_are_the_resident_batches():
    store = torch.randint(0, 256, (40, 1, 3, 3), dtype=torch.uint8)
    index = torch.randperm(40)[:33]
    y = torch.arange(33)
    torch.manual_seed(1)
    resident = [(x.clone(), t.clone()) for x, t in IndexBatches(store, index, y, 5, shuffle=True)]
    torch.manual_seed(1)
    streamed = list(StreamedBatches(store, index, y, 5, shuffle=True))
    assert len(resident) == len(streamed) == 7
    for (a, b), (c, d) in zip(resident, streamed):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert torch.equal(resident[0][0][0], store[index[resident[0][1][0]]])
    it = iter(StreamedBatches(store, index, y, 5, shuffle=False))
    next(it)
    it.close()  # an epoch left early stops its gatherer thread
    assert not [t for t in __import__("threading").enumerate() if t.name == "lab-batches"]


def test_a_gather_error_reaches_the_training_thread():
    class Broken(StreamedBatches):
        def _batches(self, order):
            raise OSError("disk went away")
            yield

    with pytest.raises(OSError, match="disk went away"):
        list(Broken(torch.zeros(4, 1, 1, 1, dtype=torch.uint8), torch.arange(4), torch.arange(4), 2, False))


@pytest.mark.parametrize("bad", ["fast", "Resident"])
def test_placement_mode_is_checked(bad):
    with pytest.raises(LabError, match=f"data.placement='{bad}' is not valid"):
        Synthetic(placement=bad)


def test_resident_budget_is_checked():
    with pytest.raises(LabError, match="data.resident_max_gb=-1"):
        Synthetic(resident_max_gb=-1)


def test_auto_placement_follows_the_measured_budget():
    dm = Synthetic(n_train=64, n_test=16, batch_size=8, resident_max_gb=1e-9)
    dm.setup("fit")
    decision = dm.decide_placement(torch.device("cpu"))
    assert decision.name == "stream" and "data.resident_max_gb" in decision.why
    assert Synthetic(n_train=64, n_test=16, batch_size=8).decide_placement(torch.device("cpu")).name == "resident"


@pytest.mark.slow
def test_streamed_training_gives_the_resident_metrics(tmp_path, mlflow_uri, image_folder):
    from lab.train import job

    root = image_folder(per_class=16, side=12)
    common = ["data=image_folder", f"data.root={root}", "data.image_size=8", f"data.cache_dir={tmp_path / 'cache'}",
              "data.batch_size=8", "model=mlp", "model.net.hidden=[16]", "trainer.max_epochs=2",
              "trainer.accelerator=cpu", "mlflow.experiment=placement"]
    resident = job.run(load([*common, "data.placement=resident"]), tmp_path / "r")
    streamed = job.run(load([*common, "data.resident_max_gb=1e-9"]), tmp_path / "s")  # auto must stream
    for key in ("train/loss", "val/loss", "val/acc", "test/acc", "test/loss"):
        assert streamed[key] == pytest.approx(resident[key], abs=1e-6), key
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("placement").experiment_id])
    assert sorted(r.data.tags["lab.data_placement"] for r in runs) == ["resident", "stream"]
    reasons = {r.data.tags["lab.data_placement"]: r.data.tags["lab.data_placement_reason"] for r in runs}
    assert reasons["resident"] == "data.placement=resident" and "data.resident_max_gb" in reasons["stream"]


# -- the decoded cache -------------------------------------------------------------------------------
DECODE = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    from lab.data.folder import ImageFolder
    dm = ImageFolder(root=sys.argv[1], image_size=24, batch_size=4, cache_dir=sys.argv[2], decode_threads=1)
    dm.setup("fit")
    print("SUM", int(dm.splits["train"].x.sum()), int(dm.splits["test"].x.sum()))
""")


def test_two_processes_decoding_one_folder_decode_it_once(tmp_path, image_folder):
    root = image_folder(per_class=60, side=64)
    procs = [subprocess.Popen([sys.executable, "-c", DECODE, str(root), str(tmp_path / "cache")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(out.count("lab.data.folder decoding 180 images") for out in outs) == 1, outs
    sums = [next(line for line in out.splitlines() if line.startswith("SUM")) for out in outs]
    assert sums[0] == sums[1]
    assert len(list((tmp_path / "cache").glob("*.u8"))) == 1 and not list((tmp_path / "cache").glob("*.tmp"))


def test_cache_cap_removes_the_least_recently_used(tmp_path, image_folder):
    root = image_folder(per_class=8)
    folder = tmp_path / "cache"
    for size in (8, 12, 10):
        folder_dm(root, tmp_path, image_size=size).setup("fit")
    by_size = {e.info["shape"][2]: e for e in cache.entries(folder)}
    # 8 px used again: 12 px is now the least recently used. A second later than the newest, explicitly: file
    # times tick in jiffies (~4 ms), and the entry just written may share its tick with this touch.
    newest = max(e.meta.stat().st_mtime for e in by_size.values()) + 1
    os.utime(by_size[8].meta, (newest, newest))
    assert [e.info["shape"][2] for e in cache.entries(folder)] == [12, 10, 8]
    bytes_of = {k: e.data.stat().st_size + e.meta.stat().st_size for k, e in by_size.items()}
    cache.evict(folder, bytes_of[8] + bytes_of[10])
    assert [e.info["shape"][2] for e in cache.entries(folder)] == [10, 8]
    # A new entry over data.cache_max_gb evicts the others, never itself.
    folder_dm(root, tmp_path, image_size=6, cache_max_gb=1e-9).setup("fit")
    assert [e.info["shape"][2] for e in cache.entries(folder)] == [6]


@pytest.mark.slow
def test_lab_data_cache_lists_and_clears(tmp_path, image_folder, lab):
    root = image_folder(per_class=8)
    folder_dm(root, tmp_path).setup("fit")
    listed = lab("data", "cache", "--dir", tmp_path / "cache")
    assert listed.returncode == 0, listed.stderr
    assert "1 decoded folder(s)" in listed.stdout and str(root) in listed.stdout and "24x3x16x16" in listed.stdout
    cleared = lab("data", "cache", "--dir", tmp_path / "cache", "--clear")
    assert cleared.returncode == 0 and "removed 1 decoded folder(s)" in cleared.stdout
    assert cache.entries(tmp_path / "cache") == []


def test_a_damaged_cache_entry_is_decoded_again(tmp_path, image_folder):
    root = image_folder(per_class=6)
    first = folder_dm(root, tmp_path)
    first.setup("fit")
    expected = first.splits["train"].x  # a copy: the mapping itself must not be read once the file is cut
    del first
    (entry,) = cache.entries(tmp_path / "cache")
    with open(entry.data, "r+b") as f:
        f.truncate(100)
    again = folder_dm(root, tmp_path)
    again.setup("fit")
    assert torch.equal(again.splits["train"].x, expected)
    assert entry.complete()


# -- a folder of images plus a CSV --------------------------------------------------------------------
def csv_folder(tmp_path, image_folder, rows=None):
    src = image_folder(per_class=8)
    flat = tmp_path / "flat"
    flat.mkdir()
    lines = ["id,breed"]
    for cls in ("cat", "dog", "fox"):
        for f in sorted((src / cls).iterdir()):
            (flat / f"{cls}_{f.name}").write_bytes(f.read_bytes())
            lines.append(f"{cls}_{f.stem},{cls}")
    (tmp_path / "train.csv").write_text("\n".join(rows or lines) + "\n")
    return flat


def csv_dm(tmp_path, root, **kwargs) -> ImageCSV:
    return ImageCSV(root=str(root), csv=str(tmp_path / "train.csv"), filename_column="id", label_column="breed",
                    suffix=".png", image_size=16, batch_size=4, cache_dir=str(tmp_path / "cache"), **kwargs)


def test_csv_layout_loads_like_the_folder(tmp_path, image_folder):
    root = csv_folder(tmp_path, image_folder)
    dm = csv_dm(tmp_path, root)
    dm.setup("fit")
    assert dm.class_names == ["cat", "dog", "fox"] and sum(len(s) for s in dm.splits.values()) == 24
    by_name = {os.path.basename(p): int(y) for s in dm.splits.values() for p, y in zip(s.paths, s.y)}
    assert by_name["dog_3.png"] == 1 and by_name["fox_0.png"] == 2


def test_csv_missing_files_are_listed_and_strict_refuses(tmp_path, image_folder):
    root = csv_folder(tmp_path, image_folder)
    (root / "cat_2.png").unlink()
    dm = csv_dm(tmp_path, root)
    dm.setup("fit")
    assert dm.skipped == [f"{root / 'cat_2.png'}: missing (line 4 of train.csv)"]
    with pytest.raises(LabError, match="cannot be read, with data.strict=true.*cat_2.png"):
        csv_dm(tmp_path, root, strict=True).setup("fit")


def test_csv_unknown_label_and_missing_column_are_sentences(tmp_path, image_folder):
    root = csv_folder(tmp_path, image_folder)
    with pytest.raises(LabError, match=r"line 10: label 'dog' is not one of data.classes \['cat', 'fox'\]"):
        csv_dm(tmp_path, root, classes=["cat", "fox"]).setup("fit")
    dm = ImageCSV(root=str(root), csv=str(tmp_path / "train.csv"), image_size=16)
    with pytest.raises(LabError, match=r"no column\(s\) \['filename', 'label'\]: its columns are \['id', 'breed'\]"):
        dm.setup("fit")


def test_csv_with_no_file_under_root_says_so(tmp_path, image_folder):
    csv_folder(tmp_path, image_folder)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(LabError, match="none of the 24 files listed .* is data.root the folder"):
        csv_dm(tmp_path, elsewhere).setup("fit")


def test_csv_conflicting_labels_for_one_file(tmp_path, image_folder):
    rows = ["id,breed", "cat_0,cat", "cat_1,cat", "cat_0,dog"]
    root = csv_folder(tmp_path, image_folder, rows=rows)
    with pytest.raises(LabError, match="line 4: cat_0 is labelled 'dog' here and 'cat' on line 2"):
        csv_dm(tmp_path, root).setup("fit")


@pytest.mark.slow
def test_lab_train_on_a_csv_layout(tmp_path, image_folder, lab):
    root = csv_folder(tmp_path, image_folder)
    done = lab("train", "data=image_csv", f"data.root={root}", f"data.csv={tmp_path / 'train.csv'}",
               "data.filename_column=id", "data.label_column=breed", "data.suffix=.png", "data.image_size=8",
               f"data.cache_dir={tmp_path / 'cache'}", "data.batch_size=4", "model=mlp", "trainer.max_epochs=1")
    assert done.returncode == 0, done.stderr[-2000:]
    missing = lab("train", "data=image_csv", f"data.root={root}", "data.csv=nope.csv", "model=mlp")
    assert missing.returncode == 2 and "data.csv=nope.csv is not a file" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_gpu_placement_divides_free_memory_among_the_slots(monkeypatch):
    """The GPU branch's arithmetic, on a CPU machine: the card's measured free memory is the one input faked."""
    from lab.data import placing

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40e9, 80e9))
    monkeypatch.setenv(placing.SLOTS_ENV, "4")
    fits = placing.decide("auto", int(4.9e9), torch.device("cuda", 0))
    assert fits.resident and fits.why == "4.90 GB of data <= 5.00 GB (0.5 x 40.00 GB free on cuda:0 / 4 slot(s))"
    assert not placing.decide("auto", int(5.1e9), torch.device("cuda", 0)).resident


def test_auto_workers_per_gpu_counts_the_data():
    from lab.sweep import pool

    card = 80 * 2**30
    assert pool.auto_per_gpu(100_000, card) == 8
    assert pool.auto_per_gpu(100_000, card, data_bytes=10 * 2**30) == 3  # 11 GiB a slot in half the card
    assert pool.auto_per_gpu(100_000, card, data_bytes=60 * 2**30) == 8  # too big for any slot: streamed


@pytest.mark.slow
def test_a_sweep_over_its_resident_limit_streams_to_the_resident_metrics(workdir, lab, journal, image_folder):
    """The limit is imposed through data.resident_max_gb (far below the data's size): every trial streams, and
    each one's value is what the same trial gives training resident in this process."""
    from lab.train import job

    tmp, env = workdir
    root = image_folder(tmp / "pets", per_class=16, side=12)
    overrides = ["data=image_folder", f"data.root={root}", "data.image_size=8", f"data.cache_dir={tmp / 'cache'}",
                 "data.batch_size=8", "model=mlp", "model.net.hidden=[16]", "trainer.max_epochs=2"]
    path = tmp / "stream.yaml"
    path.write_text(json.dumps({"study": "streamed", "overrides": [*overrides, "data.resident_max_gb=1e-9"],
                                "metric": "val/loss", "direction": "minimize", "n_trials": 2,
                                "sampler": {"name": "grid"},
                                "params": {"model.optimizer.lr": {"type": "categorical", "choices": [0.01, 0.05]}}}))
    done = lab("sweep", path, "--workers", "1", "--no-live", env_extra={"LAB_TORCH_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    study = journal(tmp, "streamed")
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    torch.set_num_threads(1)
    for trial in study.trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["lab.data_placement"] == "stream", run.data.tags.get("lab.data_placement_reason")
        lr = trial.params["model.optimizer.lr"]
        alone = job.run(load([*overrides, f"model.optimizer.lr={lr}", "data.placement=resident",
                              "mlflow.experiment=resident", f"mlflow.tracking_uri={env['MLFLOW_TRACKING_URI']}"]),
                        tmp / f"alone_{lr}")
        assert trial.value == pytest.approx(alone["val/loss"], abs=1e-5), lr
