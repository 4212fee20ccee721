"""Install croc as a user would: sdist -> wheel -> a fresh virtual environment, used from outside the repo.

The wheel is built from the files git tracks (plus new, not ignored ones), never from this checkout's
build products (``croc/_C*.so``, the ``croc/kernels`` symlink), so a file that only a checkout has
cannot hide a hole in the package. The fresh venv sees the torch under test (and the other
dependencies) through a ``.pth`` line naming this interpreter's site-packages, whose own ``.pth``
files (an editable croc among them) are not run; croc itself comes from the wheel alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.wheel]


def _run(*cmd: str | Path, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run cmd in cwd without this session's PYTHONPATH; fail with its output if it fails."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    full_env.update(env)
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=full_env, capture_output=True, text=True)
    assert proc.returncode == 0, (
        f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc


def _source_files() -> list[str]:
    """The repository's files as a fresh clone has them (tracked, plus new files git does not ignore)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs a git checkout of croc")
    return [name for name in out.decode().split("\0") if name and (ROOT / name).is_file()]


def _copy_tree(files: list[str], dest: Path) -> None:
    for name in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((ROOT / name).read_bytes())


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Build the sdist from a clean copy of the sources, then the wheel from the unpacked sdist."""
    tmp = tmp_path_factory.mktemp("wheel")
    files = _source_files()
    _copy_tree(files, tmp / "src")
    _run(sys.executable, "setup.py", "-q", "sdist", "-d", tmp / "sdist", cwd=tmp / "src")
    (sdist,) = (tmp / "sdist").glob("croc-*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    (unpacked,) = (tmp / "unpacked").iterdir()
    _run(
        sys.executable,
        *("-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", tmp / "dist", unpacked),
        cwd=tmp,
        CROC_SKIP_CUDA_BUILD="1",  # the CUDA part is compiled by tests/test_cuda_compile.py
        MAX_JOBS="2",
    )
    (wheel,) = (tmp / "dist").glob("croc-*.whl")
    return {"tmp": tmp, "wheel": wheel, "sources": files}


def _expected_package_files(sources: list[str]) -> set[str]:
    """Every module and config the package needs, by its path inside the wheel."""
    wheel_paths = {
        "croc/kernels/" + name[len("kernels/") :] if name.startswith("kernels/") else name for name in sources
    }
    return {name for name in wheel_paths if name.startswith("croc/") and name.endswith((".py", ".json"))}


def test_wheel_holds_the_whole_package(built):
    names = set(zipfile.ZipFile(built["wheel"]).namelist())
    missing = _expected_package_files(built["sources"]) - names
    assert not missing, f"the wheel lacks {sorted(missing)}"
    assert {
        "croc/train/__init__.py",
        "croc/train/configs/zero2.json",
        "croc/train/configs/zero3.json",
    } <= names
    assert any(name.startswith("croc/_C") and name.endswith(".so") for name in names), (
        "no croc._C in the wheel"
    )


@pytest.fixture(scope="module")
def user_venv(built) -> Path:
    """A fresh venv with the wheel installed; the torch under test is visible, no croc checkout is."""
    env_dir = built["tmp"] / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site_dir = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    ours |= {p for p in sys.path if p.endswith(("site-packages", "dist-packages"))}
    (site_dir / "zz_torch_under_test.pth").write_text("\n".join(sorted(ours)) + "\n")
    _run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", built["wheel"], cwd=built["tmp"])
    return env_dir


def test_installed_wheel_imports_from_outside_the_repo(user_venv, tmp_path):
    code = (
        "import croc, croc.train, croc.data, croc.model, croc._C, croc.kernels, torch\n"
        "from croc.train.run import deepspeed_config_path\n"
        "import json, os\n"
        "print(json.dumps({'croc': croc.__file__, 'C': croc._C.__file__, 'kernels': croc.kernels.__file__,\n"
        "  'zero3': os.path.isfile(deepspeed_config_path('zero3')), 'built': croc._C.torch_version(),\n"
        "  'torch': torch.__version__}))"
    )
    info = json.loads(_run(user_venv / "bin" / "python", "-c", code, cwd=tmp_path).stdout.splitlines()[-1])
    for key in ("croc", "C", "kernels"):
        assert Path(info[key]).is_relative_to(user_venv), f"{key} imported from {info[key]}, not the wheel"
    assert info["zero3"]
    assert info["built"] == info["torch"]


def test_installed_cli_runs_the_quick_demo(user_venv, tmp_path):
    croc_cli = user_venv / "bin" / "croc"
    assert "demo" in _run(croc_cli, "--help", cwd=tmp_path).stdout
    _run(croc_cli, "demo", "--quick", "--out", tmp_path / "demo", cwd=tmp_path)
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert list(metrics["stages"]) == ["projector", "croc", "finetune"]
    assert (tmp_path / "demo" / "loss.png").is_file() and (tmp_path / "demo" / "samples.md").is_file()


def test_isolated_build_stops_with_the_right_command(built, tmp_path):
    """pip's default build isolation hides the torch under test: the build must stop and say what to run."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", tmp_path, built["tmp"] / "src"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0, "an isolated build succeeded: its croc._C was built against another torch"
    assert "pip install --no-build-isolation ." in proc.stdout + proc.stderr
    assert not list(tmp_path.glob("*.whl"))
