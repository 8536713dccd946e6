"""lab as a user installs it: a wheel (not editable) in a fresh virtual environment, used from an empty
folder, finds the configs and sweeps it ships."""
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """bin/ of a fresh venv holding lab's wheel. Its dependencies (torch, Lightning, ...) come from this
    environment's site-packages through a .pth line, which does not bring this environment's editable lab."""
    tmp = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp / "dist"), str(REPO)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp / "dist").glob("lab-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    purelib = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                   "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(wheel)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    return venv / "bin"


def run(bin_dir, *args, cwd):
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(cwd), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db"}
    return subprocess.run([str(bin_dir / "lab"), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def test_the_wheel_is_not_this_checkout(installed, tmp_path):
    where = subprocess.run([str(installed / "python"), "-c", "import lab; print(lab.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    assert "site-packages" in where and str(REPO) not in where


def test_installed_lab_trains_and_sweeps_from_an_empty_folder(installed, tmp_path):
    composed = run(installed, "train", "--cfg", "job", "data=digits", cwd=tmp_path)
    assert composed.returncode == 0 and "lab.data.digits.Digits" in composed.stdout, composed.stderr
    trained = run(installed, "train", "data=digits", "model=mlp", "trainer.max_epochs=1",
                  "trainer.enable_progress_bar=false", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    swept = run(installed, "sweep", "sweeps/quickstart.yaml", "--workers", "1", "--no-live", "--n-trials", "1",
                "trainer.max_epochs=1", cwd=tmp_path)
    assert swept.returncode == 0, swept.stdout + swept.stderr
    best = run(installed, "best", "quickstart", cwd=tmp_path)
    assert best.returncode == 0, best.stderr
    assert (tmp_path / "conf" / "experiment" / "quickstart_best.yaml").is_file()  # the user's folder, not the package
    replay = run(installed, "train", "experiment=quickstart_best", "trainer.enable_progress_bar=false", cwd=tmp_path)
    assert replay.returncode == 0, replay.stderr
