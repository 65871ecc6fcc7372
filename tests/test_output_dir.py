"""Runs write under their output directory (config `output_dir`, or --directory), never into the
committed reports/ unless asked; `snakemake --report` with nothing run says so."""
import os
import subprocess
import sys
from pathlib import Path

import yaml

from helpers import make_smoke_inputs

ROOT = Path(__file__).resolve().parents[1]


def smk(cwd, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("QBENCH_")}
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=600)


def test_run_writes_under_output_dir_with_relative_sources(tmp_path):
    absolute = make_smoke_inputs(tmp_path)
    overlay = yaml.safe_load(absolute.read_text())
    # relative source paths are relative to where snakemake starts, not to the output directory
    overlay["models"]["tiny"]["source"]["path"] = "tiny-llama"
    overlay["corpora"]["tiny"]["source"]["path"] = "tiny-corpus.txt"
    overlay["output_dir"] = "out/exp1"
    (tmp_path / "exp1.yaml").write_text(yaml.safe_dump(overlay))
    p = smk(tmp_path, "--configfile", "exp1.yaml", "--cores", "1", "resources/data/tiny/tiny/corpus.json")
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "out" / "exp1"
    assert (run / "resources/models/tiny/qbench_model_card.json").exists()
    assert (run / "resources/data/tiny/tiny/corpus.json").exists() and (run / "logs").is_dir()
    assert not (tmp_path / "resources").exists() and not (tmp_path / "reports").exists()
    # --directory overrides output_dir (Snakemake changes into it first: relative paths are then
    # relative to it, so this overlay names the sources by absolute paths)
    p = smk(tmp_path, "--configfile", str(absolute), "-d", "elsewhere", "-n", "--cores", "1")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "elsewhere" / ".snakemake").is_dir() and not (tmp_path / "out" / "elsewhere").exists()


def test_default_output_dir_is_not_the_committed_report(tmp_path):
    """The default config plans into runs/default: the repository's reports/ is not an output."""
    p = smk(tmp_path, "-n", "--cores", "1", "--quiet", "rules")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "runs" / "default" / ".snakemake").is_dir()
    assert not (tmp_path / "reports").exists()
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    assert cfg["output_dir"] == "runs/default"


def test_report_with_nothing_run_says_so(tmp_path):
    overlay = make_smoke_inputs(tmp_path)
    p = smk(tmp_path, "--configfile", str(overlay), "--report", str(tmp_path / "report.html"))
    assert p.returncode != 0
    assert "marked for report but does not exist" in p.stdout + p.stderr
    assert not (tmp_path / "report.html").exists()
