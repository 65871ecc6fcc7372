"""``qbench`` command line: every workflow step is also a command.

    qbench info                                   methods, their arguments and defaults
    qbench prepare-model --source JSON --out DIR  model → HF safetensors directory
    qbench corpus NAME --source JSON --tokenizer DIR --out DIR
    qbench calib-stats --model DIR --corpus DIR --out CALIB_ROOT [--nsamples N --seqlen L --seed S]
    qbench quantize --model DIR --recipe YAML --out DIR [--calib NAME=DIR ...] [--stats CALIB_ROOT]
    qbench eval ppl   --model PATH (--text FILE [--json OUT] | --corpus NAME=DIR ... --out DIR) [--kv-protocol P,...]
    qbench eval kv    --model PATH --corpus DIR --out DIR        (needle.json, kv_memory.json)
    qbench eval tasks --model PATH --tasks T ... [--corpus NAME=DIR ...] --out FILE
    qbench eval chat  --model PATH --out FILE
    qbench eval stats --model PATH --fp-model DIR --corpus DIR --out FILE [--files DIR]
    qbench eval speed --model PATH --out FILE
    qbench report --model NAME --out DIR RECORD.json ...
    qbench export --format compressed-tensors|gguf CHECKPOINT OUT
    qbench check-html REPORT.html

Every option left out takes the pipeline's default for the same config key (written once, in the
config schema: :mod:`qbench.defaults`), and every command writes the record the pipeline's job of
that step writes (model and recipe names default to the checkpoint manifest's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .defaults import DTYPE_NAMES as DTYPES
from .defaults import EVAL, RUNTIME
from .defaults import enum
from .defaults import section as default_section
from .errors import ConfigError


def _yaml_or_json(s: str):
    """A YAML/JSON value given inline or as a file; parsed strictly (duplicate keys refused,
    malformed YAML named with file and line: :mod:`qbench.yamlio`)."""
    from .yamlio import load_yaml_file, load_yaml_text

    p = Path(s)
    return load_yaml_file(p) if p.exists() else load_yaml_text(s, "<inline YAML>")


def int_range(lo: int, hi: int | None = None):
    """argparse type: an integer in ``[lo, hi]`` (one clear line otherwise)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is out of range; allowed: {lo}..{hi if hi is not None else ''}")
        return v
    return parse


def float_open_unit(text: str) -> float:
    """argparse type: a fraction strictly between 0 and 1."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"{v} is out of range; allowed: 0 < x < 1")
    return v


def name_eq_dir(text: str) -> str:
    """argparse type: ``NAME=DIR``."""
    if "=" not in text or not text.split("=", 1)[0] or not text.split("=", 1)[1]:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=DIR")
    return text


class CommaList(argparse.Action):
    """A repeatable option taking comma lists (``--x a,b --x c`` → ``[a, b, c]``); the values given
    replace the default (the pipeline's list) instead of adding to it, as argparse's ``append``
    would."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        items = [] if current is None or current is self.default else list(current)
        setattr(namespace, self.dest, items + [v.strip() for v in values.split(",") if v.strip()])


def cmd_info(a) -> int:
    from .methods.base import available_methods, get_method

    for name in available_methods():
        m = get_method(name)
        print(f"{name}  ({m.kind})")
        for f in dataclasses.fields(m.Config):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            extra = ""
            if "choices" in f.metadata:
                extra = f" choices={list(f.metadata['choices'])}"
            elif "range" in f.metadata:
                extra = f" range={list(f.metadata['range'])}"
            print(f"    {f.name:<16} = {default!r:<12} {f.metadata.get('doc', '')}{extra}")
    return 0


def cmd_prepare(a) -> int:
    from .api import prepare_model

    card = prepare_model(_yaml_or_json(a.source), a.out)
    print(json.dumps(card, indent=2, default=str))
    return 0


def cmd_corpus(a) -> int:
    from .api import build_corpus

    meta = build_corpus(a.name, _yaml_or_json(a.source), a.out, tokenizer_dir=a.tokenizer,
                        eval_fraction=a.eval_fraction, seed=a.seed)
    print(json.dumps(meta, indent=2, default=str))
    return 0


def _named_dirs(items: list[str]) -> dict[str, str]:
    """``NAME=DIR`` options (checked by :func:`name_eq_dir`) → {name: dir}."""
    return dict(item.split("=", 1) for item in items)


def cmd_calib_stats(a) -> int:
    from .api import calib_stats_for, set_threads
    from .calib.spec import CalibSet
    from .methods.base import CalibArgs

    set_threads(a.threads)
    d = CalibArgs()  # the calibrating methods' shared defaults
    spec = CalibSet(Path(a.corpus).name, a.nsamples or d.nsamples, a.seqlen or d.seqlen,
                    d.seed if a.seed is None else a.seed)
    out = Path(a.out) / spec.key / "stats.safetensors"
    meta = calib_stats_for(a.model, a.corpus, out, spec, dtype=a.dtype, device=a.device)
    print(f"wrote {out} ({meta['layers']} layers, calibration {spec.key})")
    return 0


def cmd_quantize(a) -> int:
    from .api import quantize, set_threads, stats_dirs_for

    set_threads(a.threads)
    recipe = _yaml_or_json(a.recipe)
    calib = _named_dirs(a.calib)
    stats = stats_dirs_for(recipe, a.stats) if a.stats else {}
    man = quantize(a.model, recipe, a.out, calib_dirs=calib, stats_dirs=stats, dtype=a.dtype,
                   device=a.device, recipe_name=a.name)
    print(f"wrote {a.out}: effective bits {man['effective_bits']:.3f}, "
          f"{man['stats']['quantize_seconds']:.1f}s")
    return 0


#: keys of an evaluation section that say what a job runs on, not how (not options of its command)
JOB_KEYS = ("recipes", "tasks", "corpora")


def _names(a) -> dict:
    return {"model_name": a.model_name, "recipe_name": a.recipe_name}


def cmd_eval_ppl(a) -> int:
    from .api import evaluate_ppl, evaluate_ppl_text, set_threads, write_record
    from .methods.kv_protocol import check_kv_protocols

    protocols = check_kv_protocols(a.kv_protocol, key="--kv-protocol")  # as eval.ppl.kv_protocol
    if bool(a.text) == bool(a.corpus):
        raise ConfigError("eval ppl: give either --text FILE or --corpus NAME=DIR (one or more)")
    if a.corpus and not a.out:
        raise ConfigError("eval ppl --corpus: --out DIR is required (records ppl-NAME.json go there)")
    set_threads(a.threads)
    kw = dict(seqlen=a.seqlen, max_windows=a.max_windows, dtype=a.dtype, device=a.device,
              batch_size=a.batch_size, kv_protocol=protocols, **_names(a))
    if a.text:
        recs = {a.text: evaluate_ppl_text(a.model, a.text, **kw)}
        if a.json:
            write_record(a.json, recs[a.text])
    else:
        corpora = _named_dirs(a.corpus)
        recs = evaluate_ppl(a.model, corpora, {c: str(Path(a.out) / f"ppl-{c}.json") for c in corpora}, **kw)
    for name, rec in recs.items():
        m = rec["metrics"]
        kv = "".join(f", KV {p}: {r['ppl']:.4f}" for p, r in (m.get("by_kv_protocol") or {}).items())
        print(f"{name}: ppl {m['ppl']:.4f}  ({m['n_windows']} windows × {m['seqlen']} tokens, {m['protocol']}, "
              f"{m['tokens_per_s']:.0f} tok/s{kv})")
    return 0


def cmd_eval_kv(a) -> int:
    from .api import evaluate_kv, set_threads

    set_threads(a.threads)
    out = Path(a.out)
    recs = evaluate_kv(a.model, a.corpus, needle_json=out / "needle.json", memory_json=out / "kv_memory.json",
                       needle=_yaml_or_json(a.needle) if isinstance(a.needle, str) else a.needle,
                       memory=_yaml_or_json(a.memory) if isinstance(a.memory, str) else a.memory, dtype=a.dtype,
                       device=a.device, **_names(a))
    n, m = recs["needle"]["metrics"], recs["memory"]["metrics"]
    print(f"wrote {out}/needle.json: needle accuracy {n['accuracy']:.3f} ({n['n_correct']}/{n['n_total']})")
    for r in m["records"]:
        print(f"wrote {out}/kv_memory.json: {r['context_length']} tokens: cache bytes / fp16 {r['ratio_vs_fp16']:.3f}")
    return 0


def cmd_eval_tasks(a) -> int:
    import tempfile

    from .api import evaluate_tasks, set_threads

    if not a.tasks:
        raise ConfigError("eval tasks: --tasks is required (or a --configfile with eval.tasks.tasks)")
    set_threads(a.threads)
    options = {k: getattr(a, k) for k in EVAL["tasks"] if k not in JOB_KEYS}
    with tempfile.TemporaryDirectory(prefix="qbench-tasks-") as tmp:  # as the pipeline's job does
        rec = evaluate_tasks(a.model, list(a.tasks), a.out, corpora=_named_dirs(a.corpus),
                             options={**options, "device": a.device, "tasks_dir": a.tasks_dir or tmp,
                                      "cache_dir": a.cache_dir}, **_names(a))
    for k, v in rec["metrics"].items():
        print(f"{k}: {v}")
    return 0


def cmd_eval_chat(a) -> int:
    from .api import evaluate_chat, set_threads

    set_threads(a.threads)
    prompts = _yaml_or_json(a.prompts) if isinstance(a.prompts, str) else a.prompts
    rec = evaluate_chat(a.model, a.out, prompts=prompts, max_new_tokens=a.max_new_tokens, system=a.system,
                        dtype=a.dtype, device=a.device, **_names(a))
    for x in rec["answers"]:
        print(f"> {x['prompt']}\n{x['answer']}\n")
    return 0


def cmd_eval_stats(a) -> int:
    from .api import evaluate_stats, set_threads

    set_threads(a.threads)
    files = Path(a.files) if a.files else Path(a.out).with_suffix("")
    made = not files.exists()
    files.mkdir(parents=True, exist_ok=True)
    try:
        rec = evaluate_stats(a.fp_model, a.model, a.out, files, corpus_dir=a.corpus, n_windows=a.n_windows,
                             seqlen=a.seqlen, outlier_k=a.outlier_k, dtype=a.dtype, device=a.device, **_names(a))
    except BaseException:
        if made and not any(files.iterdir()):  # leave nothing half-made behind
            files.rmdir()
        raise
    print(f"wrote {a.out} and {files}/: " + ", ".join(f"{k} {v:.4g}" for k, v in rec["metrics"].items()
                                                       if isinstance(v, (int, float))))
    return 0


def cmd_eval_speed(a) -> int:
    from .api import evaluate_speed, set_threads

    set_threads(a.threads)
    rec = evaluate_speed(a.model, a.out, prefill=a.prefill, prompt=a.prompt, steps=a.steps, batches=a.batches,
                         repeats=a.repeats, dtype=a.dtype, device=a.device, **_names(a))
    for k, v in rec["metrics"].items():
        print(f"{k}: {v}")
    return 0


def cmd_report(a) -> int:
    from .api import build_report

    paths = build_report(a.records, a.out, model=a.model, card=a.card)
    print("\n".join(paths.values()))
    return 0


def cmd_export(a) -> int:
    from .api import export_checkpoint

    opts = {"float_type": a.float_type} if a.format == "gguf" else {}
    rec = export_checkpoint(a.checkpoint, a.out, a.format, **opts)
    v = rec["verification"]
    print(f"wrote {a.out} ({a.format}): {len(rec['layers'])} quantized layers, read back with "
          f"{v['reader']}: max |Δw| = {v['max_abs_weight_error']:g}")
    return 0


def cmd_check_html(a) -> int:
    from .report.browser import check_html_report

    r = check_html_report(a.html, screenshot=a.screenshot)
    shown = sum(i["shown"] for i in r["images"])
    print(f"{a.html}: app loaded={r['loaded']}, results={r['n_results']}, figures shown {shown}/{len(r['images'])}")
    for i in r["images"]:
        print(f"  {'ok ' if i['shown'] else 'NOT'} {i['path']} ({i['width']}x{i['height']})")
    return 0 if r["ok"] else 1


class OneLineParser(argparse.ArgumentParser):
    """A bad flag is one line (``qbench eval ppl: error: argument --seqlen: ...``) and exit 2,
    without the usage block; subcommand parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_list(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _run_options(s, dtype: str) -> None:
    s.add_argument("--dtype", default=dtype, choices=list(DTYPES), help=f"default: {dtype}, as the pipeline")
    s.add_argument("--device", default="auto")
    s.add_argument("--threads", type=int_range(1), default=None)
    s.add_argument("--configfile", action="append", default=[], metavar="YAML",
                   help="take this step's settings from a pipeline config (laid over config.yaml, in order, "
                        "as `snakemake --configfile`); options given here still win")


def _eval_options(s, dtype: str) -> None:
    s.add_argument("--model", required=True, help="qbench checkpoint or HF model directory")
    s.add_argument("--model-name", default=None, help="record's model (default: the checkpoint's model directory name)")
    s.add_argument("--recipe-name", default=None, help="record's recipe (default: the checkpoint's recipe name)")
    _run_options(s, dtype)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="qbench", description="LLM quantization benchmark")
    sub = p.add_subparsers(dest="cmd", required=True)

    sub.add_parser("info", help="list methods and their arguments").set_defaults(fn=cmd_info)

    s = sub.add_parser("prepare-model", help="materialize a model as an HF safetensors directory")
    s.add_argument("--source", required=True, help='YAML/JSON or file, e.g. "{kind: local, path: DIR}"')
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_prepare)

    s = sub.add_parser("corpus", help="build calibration/evaluation splits of a corpus")
    s.add_argument("name")
    s.add_argument("--source", required=True)
    s.add_argument("--tokenizer", required=True, help="model directory whose tokenizer to use")
    s.add_argument("--out", required=True)
    corpus_d = default_section("corpora.*")
    s.add_argument("--eval-fraction", type=float_open_unit, default=corpus_d["eval_fraction"])
    s.add_argument("--seed", type=int_range(0), default=corpus_d["seed"])
    s.set_defaults(fn=cmd_corpus)

    s = sub.add_parser("calib-stats", help="shared activation statistics of one calibration set "
                                           "(the calib_stats rule; read by SmoothQuant)")
    s.add_argument("--model", required=True, help="HF model directory")
    s.add_argument("--corpus", required=True, help="built corpus directory (its name is the calibration corpus)")
    s.add_argument("--out", required=True, help="calibration root: writes OUT/<corpus>-<n>x<seqlen>-s<seed>/")
    s.add_argument("--nsamples", type=int_range(1), default=None, help="sequences (default: the methods' 128)")
    s.add_argument("--seqlen", type=int_range(2), default=None, help="tokens per sequence (default: the methods' 2048)")
    s.add_argument("--seed", type=int_range(0), default=None, help="sampling seed (default: the methods' 0)")
    _run_options(s, RUNTIME["quantize_dtype"])
    s.set_defaults(fn=cmd_calib_stats)

    s = sub.add_parser("quantize", help="apply a recipe and write a checkpoint")
    s.add_argument("--model", required=True, help="HF model directory")
    s.add_argument("--recipe", required=True, help="YAML/JSON list of stages, or a file")
    s.add_argument("--out", required=True)
    s.add_argument("--calib", action="append", default=[], metavar="NAME=CORPUS_DIR", type=name_eq_dir)
    s.add_argument("--stats", default=None, metavar="CALIB_ROOT",
                   help="where `qbench calib-stats` wrote the shared activation statistics (SmoothQuant)")
    s.add_argument("--name", default=None, help="recipe name (for records)")
    _run_options(s, RUNTIME["quantize_dtype"])
    s.set_defaults(fn=cmd_quantize)

    e = sub.add_parser("eval", help="evaluations (one per pipeline rule eval_*)").add_subparsers(
        dest="what", required=True)
    d = EVAL["ppl"]
    s = e.add_parser("ppl", help="token-level perplexity (GPTQ protocol) on a text file or built corpora")
    s.add_argument("--text", default=None, help="a text file (tokenized with the model's tokenizer)")
    s.add_argument("--json", default=None, help="--text: write the record here")
    s.add_argument("--corpus", action="append", default=[], metavar="NAME=CORPUS_DIR", type=name_eq_dir,
                   help="built corpus (its evaluation split), as the pipeline; repeatable")
    s.add_argument("--out", default=None, help="--corpus: directory of the records ppl-NAME.json")
    s.add_argument("--seqlen", type=int_range(2), default=d["seqlen"])
    s.add_argument("--max-windows", type=int_range(1), default=d["max_windows"])
    s.add_argument("--batch-size", type=int_range(1), default=d["batch_size"])
    s.add_argument("--kv-protocol", action=CommaList, default=d["kv_protocol"], metavar="P[,P]",
                   help="KV-cache perplexity protocols of a recipe with a KV-cache stage, the first one "
                        f"the record's ppl: {', '.join(enum('eval.ppl.kv_protocol.*'))}; repeatable or a comma "
                        f"list (default: {','.join(d['kv_protocol'])}, as the pipeline)")
    _eval_options(s, d["dtype"])
    s.set_defaults(fn=cmd_eval_ppl)

    d = EVAL["kv"]
    s = e.add_parser("kv", help="needle-in-a-haystack retrieval and KV-cache bytes (rule eval_kv)")
    s.add_argument("--corpus", required=True, help="built corpus: its evaluation split is the haystack")
    s.add_argument("--out", required=True, help="directory of needle.json and kv_memory.json")
    s.add_argument("--needle", default=None, help="YAML/JSON (or file) of eval.kv.needle keys, "
                   f"over the defaults {json.dumps(d['needle'])}")
    s.add_argument("--memory", default=None, help="YAML/JSON (or file) of eval.kv.memory keys, "
                   f"over the defaults {json.dumps(d['memory'])}")
    _eval_options(s, d["dtype"])
    s.set_defaults(fn=cmd_eval_kv)

    d = EVAL["tasks"]
    s = e.add_parser("tasks", help="lm-evaluation-harness tasks on the in-memory quantized model (rule eval_tasks)")
    s.add_argument("--tasks", nargs="+", default=None,
                   help="lm-eval tasks, or qbench_mmlu, qbench_cloze_{corpus}, qbench_wikitext_{corpus} "
                        "(default: the --configfile's eval.tasks.tasks)")
    s.add_argument("--corpus", action="append", default=[], metavar="NAME=CORPUS_DIR", type=name_eq_dir,
                   help="built corpus for the {corpus} tasks; repeatable")
    s.add_argument("--out", required=True, help="the record (JSON)")
    s.add_argument("--mmlu-subset", type=int_range(1), default=d["mmlu_subset"], help="questions per MMLU subject")
    s.add_argument("--cloze-n", type=int_range(1), default=d["cloze_n"])
    s.add_argument("--wikitext-max-docs", type=int_range(1), default=d["wikitext_max_docs"])
    s.add_argument("--num-fewshot", type=int_range(0), default=d["num_fewshot"])
    s.add_argument("--limit", type=float, default=d["limit"])
    s.add_argument("--batch-size", type=int_range(1), default=d["batch_size"])
    s.add_argument("--max-length", type=int_range(16), default=d["max_length"])
    s.add_argument("--tasks-dir", default=None, help="keep the generated local tasks here (default: a temporary dir)")
    s.add_argument("--cache-dir", default=None, help="lm-eval request cache")
    _eval_options(s, d["dtype"])
    s.set_defaults(fn=cmd_eval_tasks)

    d = EVAL["chat"]
    s = e.add_parser("chat", help="chat prompts through the chat template and the recipe's KV cache (rule eval_chat)")
    s.add_argument("--out", required=True, help="the record (JSON)")
    s.add_argument("--prompts", default=d["prompts"], help="YAML/JSON list (or file) of prompts (default: the seed's)")
    s.add_argument("--max-new-tokens", type=int_range(1), default=d["max_new_tokens"])
    s.add_argument("--system", default=d["system"])
    _eval_options(s, d["dtype"])
    s.set_defaults(fn=cmd_eval_chat)

    d = EVAL["stats"]
    s = e.add_parser("stats", help="weight/activation statistics and distance to the fp model (rule eval_stats)")
    s.add_argument("--fp-model", required=True, help="the fp model directory the checkpoint was quantized from")
    s.add_argument("--corpus", required=True, help="built corpus: activations from its evaluation split")
    s.add_argument("--out", required=True, help="the record (JSON)")
    s.add_argument("--files", default=None, help="CSVs and plots (default: the record's path without .json)")
    s.add_argument("--n-windows", type=int_range(1), default=d["n_windows"])
    s.add_argument("--seqlen", type=int_range(8), default=d["seqlen"])
    s.add_argument("--outlier-k", type=float, default=d["outlier_k"])
    _eval_options(s, d["dtype"])
    s.set_defaults(fn=cmd_eval_stats)

    d = EVAL["speed"]
    s = e.add_parser("speed", help="prefill / decode tokens/s and peak memory on this device (rule eval_speed)")
    s.add_argument("--out", required=True, help="the record (JSON)")
    s.add_argument("--prefill", type=int_range(1), default=d["prefill"])
    s.add_argument("--prompt", type=int_range(1), default=d["prompt"])
    s.add_argument("--steps", type=int_range(1), default=d["steps"])
    s.add_argument("--batches", type=_int_list, default=d["batches"], help="comma-separated, e.g. 1,16")
    s.add_argument("--repeats", type=int_range(1), default=d["repeats"])
    _eval_options(s, d["dtype"])
    s.set_defaults(fn=cmd_eval_speed)

    s = sub.add_parser("report", help="tables and figures from records")
    s.add_argument("records", nargs="+")
    s.add_argument("--model", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--card", default=None, help="model card JSON (adds weight memory and the Pareto plot)")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("export", help="export a checkpoint for another runtime (exact, or refused "
                                      "naming the recipe stage that blocks it)")
    s.add_argument("--format", required=True, choices=["compressed-tensors", "gguf"])
    s.add_argument("--float-type", default=default_section("export.*")["float_type"],
                   choices=list(enum("export.*.float_type")),
                   help="gguf: type of the unquantized tensors (auto = the checkpoint's precision)")
    s.add_argument("checkpoint")
    s.add_argument("out")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("check-html", help="open a `snakemake --report` HTML in headless Chromium and "
                                          "check that every figure is shown")
    s.add_argument("html")
    s.add_argument("--screenshot", default=None, help="PNG of the last figure view")
    s.set_defaults(fn=cmd_check_html)
    return p


def _merged_config(files: list[str]) -> dict:
    """The repository's config.yaml with ``files`` laid over it in order (dicts merged, other values
    replaced), as ``snakemake --configfile F ...`` reads its config."""
    import yaml

    from .defaults import SCHEMA_PATH

    def merge(a: dict, b: dict) -> dict:
        return {**a, **{k: merge(a[k], v) if isinstance(a.get(k), dict) and isinstance(v, dict) else v
                        for k, v in b.items()}}

    cfg: dict = {}
    for f in [SCHEMA_PATH.parents[2] / "config.yaml", *files]:
        cfg = merge(cfg, yaml.safe_load(Path(f).read_text(encoding="utf-8")) or {})
    return cfg


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line; with ``--configfile`` the step's settings in that pipeline config
    (over the schema's defaults: what the rule would pass) become the options' defaults."""
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "configfile", None):
        return a
    from .defaults import settings

    cfg = _merged_config(a.configfile)
    section = settings(cfg, f"eval.{a.what}") if a.cmd == "eval" else \
        {"dtype": settings(cfg, "runtime")["quantize_dtype"]}
    sub = next(x for x in parser._actions if x.dest == "cmd").choices[a.cmd]
    if a.cmd == "eval":
        sub = next(x for x in sub._actions if x.dest == "what").choices[a.what]
    dests = {x.dest for x in sub._actions}
    sub.set_defaults(**{k: v for k, v in section.items() if k in dests})
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user error (:func:`qbench.errors.user_error_line`) is one line on stderr,
    ``qbench: error: ...``, and exit status 2 (argparse's, for bad flags too); anything else is a
    bug and keeps its traceback."""
    from .errors import user_error_line

    a = parse_args(argv)
    try:
        return a.fn(a)
    except Exception as e:
        line = user_error_line(e)
        if line is None:
            raise
        print(f"qbench: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
