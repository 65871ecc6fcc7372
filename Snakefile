# qbench: models × recipes × evaluations → cached checkpoints → records → tables, plots, report.
# This file only loads and validates the config and includes the rules (see workflow/rules/).
from snakemake.utils import min_version

from qbench import jobserver

from qbench.workflow import check_config_files, group_recipes, or_exit, pin_run_dir, prepare_output_dir, validate_config

min_version("9.0")


# Config files are parsed strictly first (duplicate keys, malformed YAML: one line naming file and
# line); a bad value is one line naming the key and the allowed values (no schema dump).
or_exit(check_config_files, f"{workflow.basedir}/config.yaml", *workflow.config_settings.configfiles)


configfile: f"{workflow.basedir}/config.yaml"


or_exit(validate_config, config, f"{workflow.basedir}/workflow/schemas/config.schema.yaml")
# the default config's recipe order, an overlay's extra recipes beside those of the same method
config["recipes"] = group_recipes(config.get("recipes") or {}, f"{workflow.basedir}/config.yaml")


# Every run writes under its own output directory (`output_dir`, default runs/default; Snakemake's
# --directory overrides it), so no run touches the committed reports/ unless asked to
# (`--config output_dir=.`). Relative source paths are relative to where snakemake was started;
# cluster jobs inherit both directories (see qbench.workflow.prepare_output_dir).
workdir: prepare_output_dir(config)


pin_run_dir()


report: "reports/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/calibrate.smk"
include: "workflow/rules/quantize.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/report.smk"


# Local runs start one job server (runtime.job_server, qbench.jobserver): a warm interpreter that
# has imported torch, qbench and transformers' modeling code once and runs each job in a forked
# child (the job's own process waits for it), instead of every job paying those imports (~6 s of
# CPU each). Cluster jobs (and any job that cannot reach it) run in their own processes, and so
# do all jobs where they may use a GPU (CUDA must not be touched before fork()).
onstart:
    if jobserver.wanted(RUNTIME["job_server"], workflow.local_exec, GPUS):
        jobserver.start("logs/job_server.log")


onsuccess:
    jobserver.stop()


onerror:
    jobserver.stop()


rule all:
    input:
        all_targets(),
    default_target: True
