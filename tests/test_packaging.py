"""The distribution installs one top-level package, `mbxfer`, and the code imports only it.

The repository keeps `agents/`, `envs/`, `exploration/` and `benchmarks/` at its top level; the
wheel maps them to `mbxfer.agents`, ... (pyproject's `package-dir`), so that a researcher's own
`envs/` package or another distribution owning `benchmarks` never collides with ours.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE_FOLDERS = ("agents", "envs", "exploration", "benchmarks")


def _build_wheel(out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = out.glob("mbxfer-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return _build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_installs_only_mbxfer_with_every_source_module(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = archive.read(
            next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        ).decode()
    top_level = {
        name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")
    }
    assert top_level == {"mbxfer"}
    for folder in SOURCE_FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            assert f"mbxfer/{path.relative_to(ROOT)}" in names, path
    assert "mbxfer/benchmarks/configs/quickstart.yaml" in names
    assert "mbxfer = mbxfer.benchmarks.cli:main" in entry_points


def _imported_modules(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_code_imports_the_packages_only_through_mbxfer():
    """A bare `import envs` would load a second copy of a module (or someone else's `envs`)."""
    offenders = []
    for folder in (*SOURCE_FOLDERS, "mbxfer", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for module in _imported_modules(path):
                if module.split(".")[0] in SOURCE_FOLDERS:
                    offenders.append(f"{path.relative_to(ROOT)}: {module}")
    assert not offenders, "import these as mbxfer.<package>: " + ", ".join(offenders)


@pytest.mark.slow
def test_installs_beside_a_package_owning_benchmarks_and_a_local_envs(tmp_path, wheel):
    """In a fresh virtualenv that also holds a distribution owning `benchmarks`, run from a
    folder with its own `envs/` package: `mbxfer` works, and uninstalling either distribution
    leaves the other's files in place. Dependencies come from this test's own environment
    (a `.pth` line), so nothing is downloaded."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    ours = Path(next(p for p in sys.path if p.endswith("site-packages")))
    (site / "deps.pth").write_text(f"{ours}\n")  # plain path line: our editable finder stays out
    other = tmp_path / "other"
    (other / "benchmarks").mkdir(parents=True)
    (other / "benchmarks" / "__init__.py").write_text("OWNER = 'other'\n")
    (other / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "other-benchmarks"\nversion = "1.0"\n'
        '[tool.setuptools]\npackages = ["benchmarks"]\n'
    )
    pip = [python, "-m", "pip", "install", "--quiet", "--no-deps"]
    subprocess.run([*pip, str(other)], check=True)
    subprocess.run([*pip, str(wheel)], check=True)
    work = tmp_path / "research"
    (work / "envs").mkdir(parents=True)
    (work / "envs" / "__init__.py").write_text("OWNER = 'researcher'\n")
    env = {**os.environ, "PYTHONPATH": ""}
    run = [
        env_dir / "bin" / "mbxfer",
        "run",
        "--agent",
        "random",
        "--env",
        "grid",
        "--task",
        "reach_bottom_right",
        "--steps",
        "200",
        "--out",
        str(work / "trial"),
        "--no-progress",
        "--set",
        "train.eval_every=200",
        "--set",
        "train.eval_episodes=2",
    ]
    subprocess.run(run, cwd=work, env=env, check=True, capture_output=True)
    assert (work / "trial" / "done.json").exists()
    probe = "import envs, benchmarks, mbxfer.envs.registry; print(envs.OWNER, benchmarks.OWNER)"
    shown = subprocess.run(
        [python, "-c", probe], cwd=work, env=env, check=True, capture_output=True, text=True
    )
    assert shown.stdout.split() == ["researcher", "other"]
    subprocess.run([python, "-m", "pip", "uninstall", "--quiet", "-y", "mbxfer"], check=True)
    assert (site / "benchmarks" / "__init__.py").exists()
    subprocess.run([*pip, str(wheel)], check=True)
    subprocess.run(
        [python, "-m", "pip", "uninstall", "--quiet", "-y", "other-benchmarks"], check=True
    )
    assert (site / "mbxfer" / "benchmarks" / "cli.py").exists()
    version = subprocess.run(
        [env_dir / "bin" / "mbxfer", "--version"],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    assert version.stdout.strip() == "mbxfer 0.1.0"
