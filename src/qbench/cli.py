"""``qbench`` command line: every workflow step is also a command.

    qbench info                                   methods, their arguments and defaults
    qbench prepare-model --source JSON --out DIR  model → HF safetensors directory
    qbench corpus NAME --source JSON --tokenizer DIR --out DIR
    qbench quantize --model DIR --recipe YAML --out DIR [--calib NAME=DIR ...]
    qbench eval ppl --model PATH --text FILE [--seqlen N] [--max-windows K] [--json OUT]
    qbench report --model NAME --out DIR RECORD.json ...
    qbench export --format compressed-tensors|gguf CHECKPOINT OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .defaults import DTYPE_NAMES as DTYPES
from .defaults import PPL_SEQLEN as SEQLEN


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


def cmd_quantize(a) -> int:
    from .api import quantize

    recipe = _yaml_or_json(a.recipe)
    calib = dict(kv.split("=", 1) for kv in a.calib)
    man = quantize(a.model, recipe, a.out, calib_dirs=calib, dtype=a.dtype, device=a.device,
                   recipe_name=a.name)
    print(f"wrote {a.out}: effective bits {man['effective_bits']:.3f}, "
          f"{man['stats']['quantize_seconds']:.1f}s")
    return 0


def cmd_eval_ppl(a) -> int:
    from .api import evaluate_ppl_text, set_threads, write_record

    set_threads(a.threads)
    rec = evaluate_ppl_text(a.model, a.text, seqlen=a.seqlen, max_windows=a.max_windows,
                            dtype=a.dtype, device=a.device)
    m = rec["metrics"]
    print(f"ppl {m['ppl']:.4f}  ({m['n_windows']} windows × {m['seqlen']} tokens, {m['protocol']}, "
          f"{m['tokens_per_s']:.0f} tok/s)")
    if a.json:
        write_record(a.json, rec)
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
    s.add_argument("--eval-fraction", type=float_open_unit, default=0.5)
    s.add_argument("--seed", type=int_range(0), default=0)
    s.set_defaults(fn=cmd_corpus)

    s = sub.add_parser("quantize", help="apply a recipe and write a checkpoint")
    s.add_argument("--model", required=True, help="HF model directory")
    s.add_argument("--recipe", required=True, help="YAML/JSON list of stages, or a file")
    s.add_argument("--out", required=True)
    s.add_argument("--calib", action="append", default=[], metavar="NAME=CORPUS_DIR", type=name_eq_dir)
    s.add_argument("--name", default=None, help="recipe name (for records)")
    s.add_argument("--dtype", default="float32", choices=list(DTYPES))
    s.add_argument("--device", default="auto")
    s.set_defaults(fn=cmd_quantize)

    e = sub.add_parser("eval", help="evaluations").add_subparsers(dest="what", required=True)
    s = e.add_parser("ppl", help="token-level perplexity (GPTQ protocol) on a text file")
    s.add_argument("--model", required=True, help="HF model directory or qbench checkpoint")
    s.add_argument("--text", required=True)
    s.add_argument("--seqlen", type=int_range(2), default=SEQLEN)
    s.add_argument("--max-windows", type=int_range(1), default=None)
    s.add_argument("--dtype", default="float32", choices=list(DTYPES))
    s.add_argument("--device", default="auto")
    s.add_argument("--threads", type=int_range(1), default=None)
    s.add_argument("--json", default=None, help="write the record here")
    s.set_defaults(fn=cmd_eval_ppl)

    s = sub.add_parser("report", help="tables and figures from records")
    s.add_argument("records", nargs="+")
    s.add_argument("--model", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--card", default=None, help="model card JSON (adds weight memory and the Pareto plot)")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("export", help="export a checkpoint for another runtime (exact, or refused "
                                      "naming the recipe stage that blocks it)")
    s.add_argument("--format", required=True, choices=["compressed-tensors", "gguf"])
    s.add_argument("--float-type", default="auto", choices=["auto", "f32", "f16"],
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


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user error (:func:`qbench.errors.user_error_line`) is one line on stderr,
    ``qbench: error: ...``, and exit status 2 (argparse's, for bad flags too); anything else is a
    bug and keeps its traceback."""
    from .errors import user_error_line

    a = build_parser().parse_args(argv)
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
