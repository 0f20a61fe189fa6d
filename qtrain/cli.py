"""The `qtrain` command line: parses arguments, then calls the library.

Expected user errors (bad paths, unknown names, impossible values, corrupt files: a
`qtrain.base.errors.UserError` or one of the OS errors of a path) end with one line on stderr
and exit code 2; an interrupted run saves a checkpoint and exits with 130 (SIGINT) or 143
(SIGTERM); anything else is a bug in qtrain: it keeps its traceback, says how to report it
(with the run's meta.json) and exits with 1.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import traceback
from pathlib import Path

from qtrain.base.errors import NamesSettings, UserError
from qtrain.base.names import did_you_mean

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
SPEEDRUN_PRESET = "speedrun-binary"  # `qtrain speedrun` without --config
# What to do about a write the machine refused (`qtrain.base.io.MACHINE_ERRNOS`).
MACHINE_FIXES = {
    errno.ENOSPC: "free space",
    errno.EDQUOT: "free space within your quota",
    errno.EIO: "check the disk (the kernel log names the fault)",
    errno.EROFS: "make the file system writable or choose another --out",
}
TRAINING_COMMANDS = ("train", "speedrun", "reproduce", "demo")  # they keep a last checkpoint


class _Parser(argparse.ArgumentParser):
    """argparse with the house error style: one line, a did-you-mean, exit code 2."""

    def error(self, message: str):
        hint = _did_you_mean(message)
        self.exit(EXIT_USER_ERROR, f"qtrain: error: {message}{hint}; see `{self.prog} --help`\n")


def _did_you_mean(message: str) -> str:
    """' (did you mean X?)' for argparse's "invalid choice: V (choose from A, B, ...)"."""
    if "invalid choice: " not in message or "(choose from " not in message:
        return ""
    value = message.split("invalid choice: ", 1)[1].split(" (choose from ", 1)[0].strip("'")
    listed = message.rsplit("(choose from ", 1)[1].rstrip(")").split(", ")
    return did_you_mean(value, [c.strip("'") for c in listed])


def _add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML preset file (flat key = value; see qtrain/configs)")
    p.add_argument("--model", help="network name (qtrain list models)")
    p.add_argument("--dataset", help="data set name (qtrain list datasets)")
    p.add_argument("--method", help="training method (qtrain list methods)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--lr", type=float, help="base learning rate")
    p.add_argument(
        "--width", type=float, help="channel width multiplier (turns off a preset's fit_width)"
    )
    p.add_argument("--grid", help="binary, ternary or <k>bit")
    p.add_argument("--seed", type=int)
    p.add_argument("--data-dir", dest="data_dir", help="folder holding the data set")
    p.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fetch a missing data set (default: yes for `qtrain train`)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the model through torch.compile (pays off on GPUs and long runs)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set weight_decay=1e-5 (repeatable)",
    )


def _resolve_config(args, defaults: dict | None = None):
    """The RunConfig of the defaults, then --config, then every flag named after a config key
    (--model, --lr, --data-dir, ...), then each --set. --width turns a preset's fit_width
    off: the width named is the one trained."""
    from qtrain.train.config import from_dict, keys, load_toml, parse_override

    values = dict(defaults or {})
    if getattr(args, "config", None):
        values.update(load_toml(args.config))
    for key in keys():
        value = getattr(args, key, None)
        if value is not None:
            values[key] = value
    if getattr(args, "width", None) is not None:
        values["fit_width"] = False  # the width named is the width trained
    for item in args.set:
        key, value = parse_override(item)
        values[key] = value
    return from_dict({**_text_model_defaults(values), **values})


def _text_model_defaults(values: dict) -> dict:
    """For a text model (gpt, hf) named without a data set or policy: its own data set
    (tiny Shakespeare) and the policy `linear` (BitNet's: the block projections), where the
    image defaults (cifar10, `conv`) would be refused or quantize nothing."""
    from qtrain import models

    name = values.get("model")
    if not isinstance(name, str) or name not in models.list_models(modality="text"):
        return {}
    return {"dataset": models.model_info(name).dataset, "policy": "linear"}


def cmd_train(args) -> int:
    import qtrain.export  # noqa: F401  (init_from and distill_from may name packed files)
    from qtrain.train.distributed import DistributedContext
    from qtrain.train.trainer import train

    config = _resolve_config(args, defaults={"download": True})
    out = Path(args.out or f"runs/{config.model}-{config.dataset}-{config.method}-s{config.seed}")
    dist = DistributedContext.from_env(config.device, timeout_s=args.dist_timeout)
    try:
        with dist.naming_failed_ranks():
            metrics = train(config, out, resume=args.resume, dist=dist)
    finally:
        dist.close()
    if dist.is_main and metrics:
        last = metrics[-1]
        score = (
            f"validation loss {last['val_loss']:.4f} ({last['val_bpc']:.3f} bits per character) "
            f"after {last['step']} steps"
            if "val_bpc" in last
            else f"test error {last['test_error']:.2f}% after {last['epoch']} epochs"
        )
        print(f"finished: {score}; run folder {out}")
    return 0


def cmd_speedrun(args) -> int:
    from qtrain.experiments.speedrun import run_speedrun
    from qtrain.train.config import load_toml

    defaults = {"download": True} if args.config else {**load_toml(SPEEDRUN_PRESET),
                                                        "download": True}  # fmt: skip
    config = _resolve_config(args, defaults=defaults)
    if args.time_budget is not None:
        config = config.replace(time_budget_s=args.time_budget)
    variants = ("binary",) + ("float",) * args.float + ("paper",) * args.paper_recipe
    run_speedrun(config, Path(args.out), budget=args.budget, seeds=args.seeds,
                 variants=variants, paper_epochs=args.paper_epochs,
                 targets=args.targets, jobs=args.jobs)  # fmt: skip
    return 0


def _targets(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected accuracies in percent separated by commas (85,90), got {text!r}"
        ) from None


def _note(line: str) -> None:
    """A note for the reader on standard error, so that standard output holds the result only
    (`qtrain eval --json` piped into another program)."""
    print(line, file=sys.stderr)


def cmd_eval(args) -> int:
    from qtrain.evaluate import evaluate_file

    batch = {"batch_size": args.batch_size} if args.batch_size is not None else {}
    result = evaluate_file(args.checkpoint, data_dir=args.data_dir, tta=args.tta,
                           weights=args.weights, split=args.split, log=_note, **batch)  # fmt: skip
    if "val_bpc" in result:
        score = (f"validation loss {result['val_loss']:.4f} ({result['val_bpc']:.3f} bits per "
                 f"character) over {result['images']} tokens")  # fmt: skip
    elif args.split == "val":
        score = (f"validation error {result['val_error']:.2f}% over {result['images']} held-out "
                 "training images")  # fmt: skip
    else:
        score = f"test error {result['test_error']:.2f}% over {result['images']} images"
    print(
        json.dumps(result, indent=2)
        if args.json
        else f"{result['model']} ({result['method']}) on {result['dataset']}: {score}"
    )
    return 0


def cmd_sample(args) -> int:
    from qtrain.sample import sample_file

    top_k = None if args.top_k == 0 else args.top_k
    print(
        sample_file(
            args.run,
            chars=args.chars,
            seed=args.seed,
            prompt=args.prompt,
            temperature=args.temperature,
            top_k=top_k,
        )
    )
    return 0


def cmd_list(args) -> int:
    from qtrain import data, methods, models

    if args.what == "models":
        for name in models.list_models():
            print(f"{name:12s} {models.model_info(name).description}")
    elif args.what == "methods":
        for name in methods.list_methods():
            print(f"{name:10s} {methods.parse_method(name).describe}")
    elif args.what == "keys":
        from qtrain.train.config import describe_keys

        print(describe_keys())
    else:
        for name in data.list_datasets():
            print(f"{name:16s} {data.dataset_info(name).description}")
    return 0


def cmd_demo(args) -> int:
    from qtrain.experiments.demo import run_demo

    run_demo(Path(args.out), epochs=args.epochs, seed=args.seed, seeds=args.seeds,
             budget=args.budget, jobs=args.jobs)  # fmt: skip
    return 0


# `qtrain reproduce EXPERIMENT`: the module that runs it and its default budget.
EXPERIMENTS = {"table1": "short", "fig7": "short", "methods": "cpu", "lm": "cpu",
               "lm-recipes": "cpu"}  # fmt: skip
# their cells train on one thread each: --jobs N uses N cores
PARALLEL_EXPERIMENTS = ("methods", "lm", "lm-recipes")


def cmd_reproduce(args) -> int:
    from qtrain.experiments import comparison, fig7, lm, lm_recipes, table1

    if args.rows is not None and args.experiment != "table1":
        raise UserError("--rows applies to `reproduce table1` only; leave it out")
    if args.seeds is not None and args.experiment == "fig7":
        raise UserError("`reproduce fig7` runs one seed; leave --seeds out")
    if args.jobs != 1 and args.experiment not in PARALLEL_EXPERIMENTS:
        raise UserError(
            f"--jobs applies to `reproduce {'|'.join(PARALLEL_EXPERIMENTS)}`, whose cells train "
            "on one thread each; leave it out"
        )
    common = dict(budget=args.budget or EXPERIMENTS[args.experiment], data_dir=args.data_dir,
                  download=args.download)  # fmt: skip
    out = Path(args.out)
    if args.experiment == "table1":
        table1.run(out, rows=args.rows, seeds=args.seeds, **common)
    elif args.experiment == "fig7":
        fig7.run(out, **common)
    else:
        module = {"methods": comparison, "lm": lm, "lm-recipes": lm_recipes}[args.experiment]
        module.run(out, seeds=args.seeds, jobs=args.jobs, **common)
    return 0


def cmd_report(args) -> int:
    from qtrain.report.collect import report_runs

    report_runs([Path(p) for p in args.run_dirs], Path(args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    import qtrain

    parser = _Parser(
        prog="qtrain",
        description="Train networks with binary and low-bit weights (BC, SR, R; Li et al. 2017).",
    )
    parser.add_argument("--version", action="version", version=f"qtrain {qtrain.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("demo", help="train five methods on the embedded digits (minutes, offline)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per method (default 20)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3)")
    p.add_argument("--budget", default="full", help="full (default) or smoke (1 epoch, 1 seed)")
    p.add_argument(
        "--jobs", type=int, default=None, help="runs trained at once (default: one per core)"
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train one network with one method")
    _add_train_options(p)
    p.add_argument("--out", help="run folder (default runs/MODEL-DATASET-METHOD-sSEED)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=300.0,
        dest="dist_timeout",
        help="seconds before a distributed collective gives up on a dead rank",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("speedrun", help="time to accuracy of the binary-weight CIFAR-10 recipe")
    _add_train_options(p)
    p.add_argument("--seeds", type=int, default=None, help="seeds, from --seed on (default 1)")
    p.add_argument("--budget", default="full", help="full (default: the recipe as given) or "
                   "smoke (one short epoch on synthetic images)")  # fmt: skip
    p.add_argument("--float", action="store_true", help="also run the recipe with float weights")
    p.add_argument(
        "--paper-recipe",
        action="store_true",
        dest="paper_recipe",
        help="also run the paper's VGG-9 BC-ADAM recipe (width 0.25) under the same budget",
    )
    p.add_argument("--paper-epochs", type=int, default=12, dest="paper_epochs",
                   help="epochs of the paper recipe's step schedule (default 12)")  # fmt: skip
    p.add_argument("--time-budget", type=float, dest="time_budget",
                   help="seconds of training per run (the time_budget_s key)")  # fmt: skip
    p.add_argument("--targets", type=_targets, default=(85.0, 90.0),
                   help="accuracies to time, in percent (default 85,90)")  # fmt: skip
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, one process each (default 1); a run that leaves "
                   "threads unset then takes its share of the cores")  # fmt: skip
    p.add_argument("--out", default="runs/speedrun", help="output folder (default runs/speedrun)")
    p.set_defaults(func=cmd_speedrun)

    p = sub.add_parser("eval", help="test error of a checkpoint or packed model")
    p.add_argument("checkpoint", help="checkpoint.pt, a run folder, or a packed .safetensors")
    p.add_argument("--data-dir", dest="data_dir")
    p.add_argument("--batch-size", type=int, dest="batch_size",
                   help="evaluation minibatch (default: eval_batch_size's, 128)")  # fmt: skip
    p.add_argument("--tta", help="test-time augmentation: none, flip, flip-translate "
                   "(default: the run's own)")  # fmt: skip
    p.add_argument("--weights", default="reported", help="reported (default: the weights the "
                   "run's numbers were measured with, its EMA if it kept one) or live")  # fmt: skip
    p.add_argument("--split", default="test", help="test (default) or val: the training images "
                   "the run held out (val_images), for choosing settings")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="text generated by a trained language model")
    p.add_argument("run", help="run folder, checkpoint.pt, or a packed .safetensors")
    p.add_argument("--chars", type=int, default=500, help="characters to generate (500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (0)")
    p.add_argument("--prompt", default=None, help="text to continue (default: a newline)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (0.8)")
    p.add_argument("--top-k", type=int, default=200, dest="top_k",
                   help="sample among the k likeliest characters; 0: all (200)")  # fmt: skip
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("list", help="list models, methods, datasets or config keys")
    p.add_argument("what", choices=["models", "methods", "datasets", "keys"])
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("reproduce", help="the experiments: table1, fig7, methods, lm or lm-recipes")
    p.add_argument("experiment", choices=list(EXPERIMENTS))
    p.add_argument("--rows", nargs="+", default=None, help="Table 1 rows (default: all)")
    p.add_argument(
        "--budget",
        help="table1, fig7: short (default), paper or smoke; methods, lm: cpu (default), paper "
        "or smoke (seconds, to try the machinery); lm-recipes: cpu (default) or smoke",
    )
    p.add_argument("--seeds", type=int, help="seeds per cell (table1: 1; the others: the budget's)")
    p.add_argument(
        "--jobs", type=int, default=1,
        help="methods, lm, lm-recipes: cells trained at once, one process each (default 1; "
        "the number of cores keeps them all busy)",
    )  # fmt: skip
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--data-dir", dest="data_dir")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=True)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("report", help="redraw tables and figures from run folders")
    p.add_argument("run_dirs", nargs="+", help="run folders (or folders of run folders)")
    p.add_argument("--out", default="runs/report")
    p.set_defaults(func=cmd_report)

    for module in ("qtrain.export.cli", "qtrain.theory.cli"):
        _register_optional(module, sub)
    return parser


def _register_optional(module_name: str, sub) -> None:
    """Commands that live beside their package (export, summary, theory)."""
    import importlib
    import importlib.util

    if importlib.util.find_spec(module_name) is None:
        return
    module = importlib.import_module(module_name)
    register = getattr(module, "add_parsers", None) or module.add_parser
    register(sub)


def _user_error_types() -> tuple[type, ...]:
    """Errors an input can cause: one line and exit 2 (`qtrain.base.errors.USER_ERROR_TYPES`)."""
    from qtrain.base.errors import USER_ERROR_TYPES

    return USER_ERROR_TYPES


def main(argv: list[str] | None = None) -> int:
    # One line at a time to a file or a pipe too (a log read while the run goes on).
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    parser = build_parser()
    args = parser.parse_args(argv)
    from qtrain.train.trainer import TrainingInterrupted

    try:
        return int(args.func(args) or 0)
    except TrainingInterrupted as stop:
        signum = int(stop.args[0]) if stop.args else 2
        # `train` continues with --resume; speedrun and reproduce resume by running again
        how = "with --resume" if args.command == "train" else "by running the same command again"
        print(f"qtrain: interrupted; a checkpoint was saved, continue {how}", file=sys.stderr)
        return 128 + signum
    except KeyboardInterrupt:
        print("qtrain: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`qtrain list keys | head`): not a bug
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 128 + 13  # as a process killed by SIGPIPE
    except _user_error_types() as e:
        print(f"qtrain: error: {_one_line(e, args.command)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:
        if _is_machine_fault(e):  # the machine's condition, not a bug: one line
            print(f"qtrain: error: {_machine_fault(e, args.command)}", file=sys.stderr)
            return EXIT_USER_ERROR
        return _internal_error(args)
    except Exception:
        return _internal_error(args)


def _is_machine_fault(e: OSError) -> bool:
    """A write that the machine refused: any of `MACHINE_FIXES` raised by qtrain's writers (a
    `WriteError`, which names its file), or a full disk or read-only file system anywhere. An
    EIO from elsewhere (a read, say) keeps its traceback: it says where it happened."""
    from qtrain.base.io import WriteError

    return isinstance(e, WriteError) or e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _machine_fault(e: OSError, command: str) -> str:
    """The file, the OS's reason, and how to continue. Files are written atomically
    (`qtrain.base.io`), so whatever was there before is intact."""
    path = os.fsdecode(e.filename) if e.filename is not None else "a file"
    again = "with --resume" if command == "train" else "again"
    kept = "the last checkpoint is intact" if command in TRAINING_COMMANDS else "nothing is torn"
    reason = e.strerror or os.strerror(e.errno)
    fix = MACHINE_FIXES[e.errno]
    return f"could not write {path}: {reason}; {fix}, then run the same command {again}; {kept}"


def _internal_error(args) -> int:
    """A bug: the traceback, then one line saying how to report it (exit 1)."""
    traceback.print_exc()
    out = getattr(args, "out", None) or getattr(args, "checkpoint", None)
    meta = f" and {Path(out) / 'meta.json'}" if out and (Path(out) / "meta.json").is_file() else ""
    print(
        "qtrain: internal error: this is a bug in qtrain, not a mistake in your input; please "
        f"report it with the traceback above{meta} (qtrain {_version()}, `qtrain --version`)",
        file=sys.stderr,
    )
    return EXIT_INTERNAL_ERROR


def _version() -> str:
    import qtrain

    return qtrain.__version__


def _cli_spelling(command: str):
    """`spell(name, library spelling)` for `NamesSettings.render`: a setting as this command
    takes it, `--name` or `--name value` (--resume, --batch-size, --onnx-weights float), and
    for train and speedrun a config key without a flag of its own as `--set key=value`."""
    from qtrain.train.config import keys

    probe = argparse.ArgumentParser(add_help=False)
    _add_train_options(probe)
    own_flags = {action.dest for action in probe._actions}

    def spell(name: str, spelling: str) -> str:
        if name == "keys":
            return "`qtrain list keys`"
        if command in ("train", "speedrun") and name in keys() and name not in own_flags:
            return f"--set {spelling}"
        _, has_value, value = spelling.partition("=")
        flag = "--" + name.replace("_", "-")
        return flag if not has_value or value == "True" else f"{flag} {value.strip(chr(39))}"

    return spell


def _one_line(e: BaseException, command: str = "") -> str:
    if isinstance(e, NamesSettings):
        return " ".join(e.render(_cli_spelling(command)).split())
    if isinstance(e, FileExistsError) and e.filename:
        return f"{e.filename} is a file where a folder is needed; choose another path"
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.strerror}: {e.filename}; check the path"
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
