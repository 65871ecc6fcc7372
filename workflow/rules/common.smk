# Shared helpers: recipe resolution (validated against the method registry before any job runs),
# target lists and small accessors. Only values passed through `params:` trigger re-runs, so every
# knob that changes a result is routed through a params entry below.
import json
from pathlib import Path

from qbench.calib.spec import KEY_PATTERN as CALIB_KEY  # {corpus}-{n}x{seqlen}-s{seed}
from qbench.defaults import section as default_section, settings
from qbench.gpu import resolve_gpus
from qbench.workflow import PRIORITY, or_exit, ppl_priority, resolve_config

RESOLVED = or_exit(resolve_config, config)  # one clear line naming the bad key, before any job
MODELS = RESOLVED["models"]  # config `select.models` or every model
RECIPES = RESOLVED["selected_recipes"]  # config `select.recipes` or every recipe
# Each section is the config's over its defaults (written once, in the schema: qbench.defaults).
RUNTIME = settings(config, "runtime")
PPL_EVAL = settings(config, "eval.ppl")
PPL_CORPORA = PPL_EVAL["corpora"]
KV_EVAL = settings(config, "eval.kv")
KV_RECIPES = [r for r in KV_EVAL["recipes"] if r in RECIPES]
TASKS_EVAL = settings(config, "eval.tasks")
CHAT_EVAL = settings(config, "eval.chat")
STATS_EVAL = settings(config, "eval.stats")
SPEED_EVAL = settings(config, "eval.speed")


def corpus_settings(name):
    """One configured corpus over the defaults of every corpus entry (eval_fraction, seed)."""
    return {**default_section("corpora.*"), **config["corpora"][name]}


def _eval_recipes(section):
    """Recipes an optional evaluation runs on: its `recipes` list, or every recipe with `all`."""
    names = section["recipes"]
    return list(RECIPES) if names == "all" else [r for r in names if r in RECIPES]


EXPORTS = [e for e in RESOLVED["exports"] if e["recipe"] in RECIPES]


def all_targets():
    exports = [f"results/{m}/{e['recipe']}/export/{e['format']}/qbench-export.json"
               for m in MODELS for e in EXPORTS]
    return expand("reports/{model}/README.md", model=MODELS) + ["reports/README.md"] + exports


def export_options(wildcards):
    """Options of one configured export (JSON for params), e.g. GGUF's float_type."""
    for e in EXPORTS:
        if (e["recipe"], e["format"]) == (wildcards.recipe, wildcards.format):
            return json.dumps(e["options"], sort_keys=True)
    raise ValueError(f"{wildcards.recipe}/{wildcards.format}: not in the config's export list")


def all_records(wildcards):
    """Every record the report of one model reads."""
    recs = expand("results/{model}/{recipe}/eval/ppl-{corpus}.json", model=wildcards.model,
                  recipe=RECIPES, corpus=PPL_CORPORA)
    recs += expand("results/{model}/{recipe}/eval/{name}.json", model=wildcards.model,
                   recipe=KV_RECIPES, name=["needle", "kv_memory"])
    for section, name in ((TASKS_EVAL, "tasks"), (CHAT_EVAL, "chat"), (STATS_EVAL, "stats"),
                          (SPEED_EVAL, "speed")):
        recs += expand("results/{model}/{recipe}/eval/{name}.json", model=wildcards.model,
                       recipe=_eval_recipes(section), name=name)
    return recs


def recipe_json(wildcards):
    """The resolved recipe (every default filled), as a canonical JSON string for params."""
    return json.dumps(RESOLVED["recipes"][wildcards.recipe], sort_keys=True)


def calib_corpora(wildcards):
    """Corpus directories this recipe's stages calibrate on."""
    names = RESOLVED["calib_corpora"][wildcards.recipe]
    return {c: f"resources/data/{wildcards.model}/{c}/corpus.json" for c in names}


def calib_stats_files(wildcards):
    """Shared activation statistics this recipe's first stage reads."""
    return [f"results/{wildcards.model}/calib/{key}/stats.safetensors"
            for key in RESOLVED["calib_stats"][wildcards.recipe]]


def report_item(path, subcategory, caption):
    """A report output: shown in `snakemake --report` under the model's category, with a caption
    from reports/captions/<caption>.rst (paths relative to workflow/rules/)."""
    return report(path, category="{model}", subcategory=subcategory,
                  caption=f"../../reports/captions/{caption}.rst")


def published_for(model):
    """Published values this model's report compares with (config `published`): the CSV (absolute
    path; relative ones are relative to the repository), the file's model name and the tolerance;
    {} when none are configured for it."""
    pub = settings(config, "published")
    name = (pub.get("models") or {}).get(model)
    if not name:
        return {}
    source = pub["file"]
    path = Path(source) if Path(source).is_absolute() else Path(workflow.basedir) / source
    return {"file": str(path), "source": source, "model": name, "tolerance": pub["tolerance"]}


def threads_for(kind):
    return int(RUNTIME["threads"][kind])


GPUS = resolve_gpus(RUNTIME["gpus"])  # GPUs per GPU job; 0 = GPU rules run on the CPU


def job_resources(kind, gpu=False):
    """Resources of one job kind (prepare, quantize, eval, report) from `runtime.mem_mb` /
    `runtime.minutes`; GPU rules also ask for `runtime.gpus` GPUs (none when it is 0). Cluster
    executors turn these into the job request (SLURM: --mem, -t, --gpus); see profiles/slurm."""
    res = {"mem_mb": int(RUNTIME["mem_mb"][kind]), "runtime": int(RUNTIME["minutes"][kind])}
    if gpu and GPUS:
        res["gpu"] = GPUS
    return res


wildcard_constraints:
    model="[A-Za-z0-9][A-Za-z0-9_.+-]*",
    recipe="[A-Za-z0-9][A-Za-z0-9_.+-]*",
    corpus="[A-Za-z0-9][A-Za-z0-9_.+-]*",
    n="[0-9]+",
    seqlen="[0-9]+",
    seed="[0-9]+",
    format="compressed-tensors|gguf",
