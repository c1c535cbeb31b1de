"""The package people install: ``python -m build`` makes an sdist and, from it, a wheel; the wheel installs into a
clean venv (its dependencies resolved by pip) and runs the README's first example outside the repository."""

import glob
import os
import re
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_example(name: str) -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", f.read(), flags=re.S).group(1)


@pytest.mark.slow
def test_the_wheel_installs_into_a_clean_venv_and_runs_the_readme_example(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), ROOT], check=True, capture_output=True,
                   timeout=600)  # the sdist first, then the wheel built from the sdist
    (wheel,), (sdist,) = glob.glob(str(dist / "*.whl")), glob.glob(str(dist / "*.tar.gz"))
    assert os.path.basename(wheel).startswith("attrjax-0.2.0-py3-none-any")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {"attrjax/__init__.py", "attrjax/_versions.py", "attrjax/attribution/_gradcam.py",
            "experiments/demo.py", "experiments/configs/quick.py"} <= names
    assert not [name for name in names if name.startswith(("tests/", "benchmarks/", "docs/"))]
    with tarfile.open(sdist) as archive:
        assert "attrjax-0.2.0/README.md" in archive.getnames()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    installed = subprocess.run([python, "-m", "pip", "install", "-q", wheel], capture_output=True, text=True,
                               timeout=900)
    assert installed.returncode == 0, installed.stderr[-3000:]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    script = ("import attrjax, os\n" + _readme_example("functional")
              + "\nprint(attrjax.__version__, os.path.dirname(attrjax.__file__), float(abs(grads).sum()) > 0)\n")
    ran = subprocess.run([python, "-c", script], cwd=outside, capture_output=True, text=True, timeout=300,
                         env={key: value for key, value in os.environ.items() if key != "PYTHONPATH"})
    assert ran.returncode == 0, ran.stderr[-3000:]
    version, location, learned = ran.stdout.split()
    assert version == "0.2.0" and learned == "True"
    assert location.startswith(str(venv)), location  # the installed copy, not the repository's
    console = subprocess.run([str(venv / "bin" / "attrjax-demo"), "--help"], capture_output=True, text=True,
                             cwd=outside, timeout=300)
    assert console.returncode == 0 and "--workdir" in console.stdout + console.stderr, console.stderr[-2000:]
