"""Command line: ``mmgen {train,sample,tokenize,eval,export,prepare,plan,adapters,demo,sweep}``.

The top layer of the package: this module parses the flags and hands over to one
module per subcommand (``mmgen.commands.<name>.main(args, overrides)``), which checks
the user's input and calls the layers below (families, eval, models, train, data).
A ``UserError`` anywhere before compilation ends the run with one line
``mmgen <cmd>: error: <what is wrong>`` and exit status 2. Anything else is a bug (or
damage the command could not work around) and keeps its traceback; Ctrl-C outside
the training loop (which saves and stops cleanly) is one line and exit status 130.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from mmgen.errors import UserError
from mmgen.parallel import runtime


def _overrides(extra: list[str], parser: argparse.ArgumentParser) -> list[str]:
    out = []
    for item in extra:
        if item.startswith("--config.") and "=" in item:
            out.append(item[len("--config."):])
        else:
            parser.error(f"unrecognized argument {item!r} (config overrides look like --config.key=value)")
    return out


def _run(name: str):
    """``mmgen.commands.<name>.main(args, overrides)``, imported when the subcommand runs."""

    def run(args, overrides) -> int:
        return importlib.import_module(f"mmgen.commands.{name}").main(args, overrides)

    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmgen", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("train", help="train a model (resumes from the newest checkpoint in --workdir)")
    s.add_argument("--config", help="configs/X.py[:variant]; omitted = the workdir's config.json")
    s.add_argument("--workdir", required=True)
    s.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop with a checkpoint after N steps of this call (the schedule still runs to "
                        "total_steps; run again to resume)")
    s.set_defaults(fn=_run("train"))

    s = sub.add_parser("sample", help="sample clips for a task from a generative (or adapter) workdir")
    s.add_argument("--workdir", required=True)
    s.add_argument("--task", required=True)
    s.add_argument("--num", type=int, default=4)
    s.add_argument("--out", required=True)
    s.add_argument("--input", help="condition clip (mp4/wav) for conditional tasks")
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--guidance", type=float, default=None)
    s.add_argument("--temperature", type=float, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_run("sample"))

    s = sub.add_parser("tokenize", help="round-trip a video or sound through a tokenizer workdir")
    s.add_argument("--workdir", required=True)
    s.add_argument("--input", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--save-tokens", dest="save_tokens")
    s.set_defaults(fn=_run("tokenize"))

    s = sub.add_parser("eval", help="evaluate a workdir on a split; writes eval.json")
    s.add_argument("--workdir", required=True)
    s.add_argument("--split", default="test")
    s.add_argument("--num", type=int, default=None,
                   help="examples (clips) of the split to evaluate; families scored by their eval loss round it "
                        "up to whole batches of config.batch_size (default: the whole split for tokenizers, "
                        "config.evaluation.num for generative and adapter runs, config.eval_batches batches otherwise)")
    s.add_argument("--step", type=int, default=None,
                   help="checkpoint to evaluate (default: the newest); writes eval_step{S}.json beside eval.json")
    s.add_argument("--no-fvd", dest="no_fvd", action="store_true",
                   help="skip FVD (I3D on 224x224 clips: seconds per clip on a CPU); LPIPS, PSNR, ... still run")
    s.set_defaults(fn=_run("eval"))

    s = sub.add_parser("export", help="write a run's inference weights (safetensors), config and model card")
    s.add_argument("--workdir", required=True, help="a tokenizer or generative workdir")
    s.add_argument("--out", required=True, help="a new directory")
    s.add_argument("--step", type=int, default=None, help="checkpoint to export (default: the newest)")
    s.set_defaults(fn=_run("export"))

    s = sub.add_parser("prepare", help="build a TFDS dataset (ArrayRecord) into --data-dir")
    s.add_argument("--dataset", required=True)
    s.add_argument("--path", help="input folder (video_folder)")
    s.add_argument("--data-dir", dest="data_dir", required=True)
    s.add_argument("--builder-config", dest="builder_config", help="builder variant, e.g. tiny")
    s.set_defaults(fn=_run("prepare"))

    s = sub.add_parser("plan", help="compile the train step ahead of time; memory per device")
    s.add_argument("--config", required=True)
    s.add_argument("--devices", type=int, required=True)
    s.add_argument("--accelerator", default="h100", help="memory budget to check against")
    s.set_defaults(fn=_run("plan"))

    s = sub.add_parser("adapters", help="adapter utilities")
    asub = s.add_subparsers(dest="adapters_command", required=True)
    m = asub.add_parser("merge", help="merge task adapters into one workdir")
    m.add_argument("--workdirs", nargs="+", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--method", choices=("sum", "average", "ties", "breadcrumbs", "dare"), default=None,
                   help="how the task vectors merge (default: sum; the average for FlyLoRA adapters sharing A); "
                        "options: --config.merge.<method>.<key>=value")
    m.add_argument("--weights", type=float, nargs="*", default=None)
    m.add_argument("--fold", action="store_true", help="fold LoRA into the base weights")
    m.set_defaults(fn=_run("adapters_merge"))

    s = sub.add_parser("demo", help="the whole pipeline on synthetic data, on a CPU, in minutes")
    s.add_argument("--workdir", required=True)
    s.add_argument("--config.fast", dest="fast", action="store_true", help=argparse.SUPPRESS)
    s.set_defaults(fn=_run("demo"))

    s = sub.add_parser("sweep", add_help=False, help="run, resume or summarise a config's get_sweep() "
                       "(mmgen sweep --help for its flags)")
    s.set_defaults(fn=_run("sweep"))
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    name = args.command if args.command != "adapters" else f"adapters {args.adapters_command}"
    runtime.set_flags()  # the process-wide settings every run relies on (mmgen.parallel.runtime)
    try:
        overrides = extra if args.command == "sweep" else _overrides(extra, parser)
        return int(args.fn(args, overrides) or 0)
    except UserError as e:
        print(f"mmgen {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmgen {name}: interrupted", file=sys.stderr)
        return 130
