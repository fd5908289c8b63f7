"""The `sfckpt` command: parse options, call the library, print.

Data goes to stdout (a table, or JSON with --json); messages and progress go
to stderr. Exit codes: 0 success, 1 a check found a problem, 2 bad input or
usage. torch is imported only when a command runs, so --help is instant.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click

from . import __version__, inputs, limits, textout
from .conventions import DTYPE_ALIASES, EXIT_INTERRUPTED, INTERRUPTED, JSON_VERSION, OUTPUT_DTYPES, error_document
from .cli_words import cli_words, in_cli_words
from .errors import InputError, Opt, OptionConflict, SfckptError, SfckptWarning
from .options import Options

if TYPE_CHECKING:  # annotations only: commands import the pipeline when they run, so that --help stays fast
    from .reconstruct import Reconstruction

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2
# The repository's pages: an installed package has no docs/ folder to point at
DOCS = "https://github.com/sfckpt/sfckpt/tree/main/docs"
DOCS_EPILOG = f"Documentation: {DOCS} (the pages named in the options above)."


MAX_MESSAGE = 800  # characters of an error message (and of its hint): an input can put anything in one


def _fail(message: str, hint: str | None = None, as_json: bool | None = None, exit_code: int = EXIT_ERROR) -> None:
    message = message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE] + "…"
    hint = hint if hint is None or len(hint) <= MAX_MESSAGE else hint[:MAX_MESSAGE] + "…"
    if as_json is None:  # inside a command: its own --json decides
        ctx = click.get_current_context(silent=True)
        as_json = bool(ctx is not None and ctx.params.get("as_json"))
    if as_json:
        textout.echo_json(error_document(message, hint, exit_code))
    # click's "Did you mean '--force'?" already ends a sentence: no "?;" before the hint
    line = message + ((" " + hint[:1].upper() + hint[1:] if message.endswith(("?", "!")) else "; " + hint) if hint else "")
    textout.echo_line(f"error: {line}", err=True)
    if textout.github_actions():  # on stderr: stdout may be a JSON document
        from .github_action import append_step_summary, error_summary

        textout.annotate_error("sfckpt", line, err=True)
        append_step_summary(error_summary("sfckpt", line))
    sys.exit(exit_code)


class _Interrupts:
    """SIGINT and SIGTERM raise KeyboardInterrupt once; later ones (a storm of them) are ignored,
    so cleanup runs to the end and the exit is 130 with one line, never a traceback."""

    def __init__(self):
        self.seen = False
        self.signalled = False

    def __call__(self, signum, frame):
        from .writer import holding

        self.signalled = True
        if not self.seen:
            self.seen = True
            if not holding():  # inside a step that must not be cut (a temporary file being made or removed)
                raise KeyboardInterrupt


def _traceback() -> None:
    """The traceback SFCKPT_DEBUG=1 asks for, in the log form: its messages may quote the input."""
    textout.echo(traceback.format_exc().rstrip("\n"), err=True)


def handle_errors(func: Callable) -> Callable:
    """Turn known errors into one `error:` line and exit 2; a traceback only with SFCKPT_DEBUG=1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        handler = _Interrupts()  # SIGTERM cleans up like Ctrl-C
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            with warnings.catch_warnings():  # what the libraries warn may quote the input, too
                warnings.showwarning = textout.show_warning
                return func(*args, **kwargs)
        except SfckptError as exc:
            if os.environ.get("SFCKPT_DEBUG") == "1":
                _traceback()
            message, hint = in_cli_words(exc)
            _fail(message, hint, exit_code=exc.exit_code)
        except KeyboardInterrupt:
            handler.seen = True
            ctx = click.get_current_context(silent=True)
            if ctx is not None and ctx.params.get("as_json"):
                textout.echo_json(error_document(INTERRUPTED, None, EXIT_INTERRUPTED))
            textout.echo(f"error: {INTERRUPTED}", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except MemoryError:
            _fail("out of memory", f"see performance.md in {DOCS}")
        except OSError as exc:  # the environment, not sfckpt: a path, a permission, a full disk
            if os.environ.get("SFCKPT_DEBUG") == "1":
                _traceback()
            where = f"{exc.filename}: " if exc.filename else ""
            _fail(f"{where}{exc.strerror or exc}"[:400], "check the path, its permissions and the free space")
        except Exception as exc:  # a bug: still one line, traceback on request
            if os.environ.get("SFCKPT_DEBUG") == "1":
                _traceback()
            _fail(f"internal error: {type(exc).__name__}: {exc}"[:400], "set SFCKPT_DEBUG=1 for the traceback and report it")
        finally:
            for sig, before in previous.items():
                # After an interrupt the process is on its way out with 130: later signals of a
                # storm must not kill it by signal on the way.
                signal.signal(sig, signal.SIG_IGN if handler.signalled else before)

    return wrapper


def load_options(func: Callable) -> Callable:
    """Options that say where the weights and optimizer state are and how they were trained."""
    options = [
        click.option("--model-key", help="Entry holding the model state dict (default: detected; see inspect)."),
        click.option("--optimizer-key", help="Entry holding the optimizer state dict, e.g. optimizer_states.0."),
        click.option("--strip-prefix", metavar="PREFIX", help="Remove PREFIX (e.g. 'model.') from weight names."),
        click.option("--optimizer", "family", metavar="FAMILY", help="Optimizer family, overriding detection (see families.md in the documentation)."),
        click.option("--beta", type=float, help="β to use; required for ScheduleFreeWrapper, which does not save it."),
        click.option("--params-are", type=click.Choice(["y", "x"]), help="What the saved parameters hold, overriding the mode flag."),
        click.option(
            "--param-order",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="File with parameter names in optimizer order, one per line (mapping.md in the documentation).",
        ),
        click.option("--param-order-from", metavar="MODULE:CALLABLE",
                     help="Take the parameter order from your model's named_parameters(): file.py:callable or "
                     "package.module:callable returning it (runs your code), or a transformers class such as "
                     "transformers:BertForSequenceClassification built from config.json (mapping.md in the documentation)."),
        click.option("--config", "model_config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="config.json for a transformers class in --param-order-from (default: the checkpoint folder's)."),
        click.option("--twins", type=click.Choice(["auto", "tied", "frozen"]), default="auto", show_default=True,
                     help="Untrained tensors byte-identical to a trained one (ties saved apart, frozen copies): tied "
                     "(get its x) or frozen (kept as saved); auto refuses where the file cannot tell (mapping.md in the documentation)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


# click's name of a parameter -> the `Options` field it sets, where the two differ
_FIELDS = {"family": "optimizer", "model_spec": "bn_model", "device": "bn_device"}
_OPTION_FIELDS = frozenset(Options.__dataclass_fields__)


def takes_options(func: Callable) -> Callable:
    """Gather a command's parameters that are `Options` fields into one `options` argument (inside
    handle_errors: reading the --param-order file may fail)."""

    @functools.wraps(func)
    def wrapper(*args, **params):
        chosen = {_FIELDS.get(k, k): params.pop(k) for k in list(params) if _FIELDS.get(k, k) in _OPTION_FIELDS}
        if chosen.get("param_order") is not None:
            text = inputs.read_text(chosen["param_order"], limits.TEXT_BYTES, "--param-order", confined=False)
            chosen["param_order"] = [line.strip() for line in text.splitlines() if line.strip()]
        return func(*args, options=Options(**chosen), **params)

    return wrapper


@contextlib.contextmanager
def _collector_spared():
    """torch imported (x is computed with it), then every object alive hidden from the garbage
    collector until the block ends: reading a checkpoint makes enough objects to set off full
    collections, and each walked torch's half a million objects again (measured: 8% of a
    conversion's CPU time)."""
    import gc

    import torch  # noqa: F401

    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _reconstruction(ckpt_path: Path, options: Options):
    from .checkpoint import load
    from .reconstruct import reconstruct

    return reconstruct(load(ckpt_path, options=options), options=options)


@contextlib.contextmanager
def _progress(total: int, label: str, enabled: bool, unit: str = "bytes"):
    """A progress line on stderr (done/total, rate, ETA; see progress.py), only on a terminal and when enabled.

    Yields `update(n)`. With an unknown total it says once what is happening.
    """
    from .progress import Progress

    show = enabled and sys.stderr.isatty()
    if not show or not total:
        if show:
            textout.echo(f"{label}...", err=True)
        yield lambda n: None
        return
    bar = Progress(label, total, unit)
    bar.show()
    try:
        yield bar.update
    finally:
        bar.close()


def _status(text: str, enabled: bool) -> None:
    """What the command is doing, on a terminal, before the first progress line: reading and planning a
    big checkpoint takes seconds, which a blank screen leaves unexplained."""
    if enabled and sys.stderr.isatty():
        textout.echo_line(text, err=True)


def _warn(messages: list[str], quiet: bool = False) -> None:
    if not quiet:
        for w in messages:
            textout.echo_line(f"warning: {w}", err=True)


class OneLineErrors(click.Group):
    """click, except that usage errors are one `error:` line (and a JSON document with --json), exit 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        args = sys.argv[1:] if args is None else list(args)
        if hasattr(sys.stdout, "reconfigure"):
            # A name from an input may hold a lone surrogate, which UTF-8 cannot encode: print it as
            # an escape (as Python's stderr already does) instead of failing halfway through a table.
            sys.stdout.reconfigure(errors="backslashreplace")
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `sfckpt`: the help, as with --help
                textout.echo(exc.ctx.get_help())
                sys.exit(EXIT_OK)
            command = exc.ctx.command_path if exc.ctx else (prog_name or "sfckpt")
            _fail(exc.format_message().rstrip("."), f"try '{command} --help'", as_json="--json" in args)
        except click.ClickException as exc:
            _fail(exc.format_message().rstrip("."), None, as_json="--json" in args)
        except click.Abort:
            textout.echo(f"error: {INTERRUPTED}", err=True)
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else EXIT_OK)


@click.group(name="sfckpt", cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sfckpt")
def main() -> None:
    """Turn Schedule-Free training checkpoints into the weights to ship (x).

    Exit codes: 0 success, 1 a check found a problem, 2 bad input or usage.
    Documentation: https://github.com/sfckpt/sfckpt/tree/main/docs
    """


@main.command(short_help="Show what a training checkpoint holds and how x would be made.", epilog=DOCS_EPILOG)
@click.argument("ckpt", type=click.Path(path_type=Path))
@load_options
@click.option("--scan", is_flag=True, help="Also read tensor data to count NaN/Inf in y, z and x.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@handle_errors
@takes_options
def inspect(ckpt: Path, scan: bool, as_json: bool, options: Options) -> None:
    """Show what a training checkpoint holds and how x would be made from it.

    Reads only metadata (no tensor data) unless --scan is given.
    """
    from .inspection import describe
    from .plain_optimizers import PlainOptimizer

    try:
        recon = _reconstruction(ckpt, dataclasses.replace(options, require_beta=False, undecided_ok=True))
    except PlainOptimizer as exc:
        _describe_not_schedule_free(ckpt, exc, as_json, options)
        return
    report = describe(recon, scan=scan, spell=cli_words)
    if as_json:
        textout.echo_json(report)
    else:
        from .tables import inspect_tables  # tabulate only for people, not for --json

        textout.echo(inspect_tables(report))
        _warn(report["warnings"])


def _describe_not_schedule_free(path: Path, exc, as_json: bool, options: Options) -> None:
    """inspect of a checkpoint whose optimizer is not Schedule-Free: what it holds, and that it has no x."""
    from .checkpoint import load
    from .plain_optimizers import describe, table

    report = describe(load(path, options=options), exc)
    if as_json:
        textout.echo_json(report)
    else:
        textout.echo(table(report))


@main.command(short_help="Reconstruct x from a checkpoint and write safetensors.", epilog=DOCS_EPILOG)
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path())  # a str: a trailing "/" (a folder) must reach save()
@load_options
@click.option("--dtype", type=click.Choice([*OUTPUT_DTYPES, *DTYPE_ALIASES]), callback=lambda ctx, p, v: DTYPE_ALIASES.get(v, v),
              help="Cast floating tensors to this dtype after computing x (bf16, fp16, fp32 as in Hugging Face).")
@click.option("--max-shard-size", metavar="SIZE", help="In the folder OUT, shards of at most SIZE (e.g. 5GB) and model.safetensors.index.json; "
              "x smaller than SIZE stays one model.safetensors, as with Hugging Face.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--workers", type=click.IntRange(min=1, max=1024), default=1, show_default=True,
              help="Write the shards of a folder OUT in this many processes (same bytes as one; at most 1024).")
@click.option("--allow-nonfinite", is_flag=True, help="Write x even if it holds NaN or Inf.")
@click.option("--bn-calib", metavar="DATA", help="Re-estimate BatchNorm statistics at x on DATA: a .pt/.safetensors/.npy "
              "file of inputs (first dimension = samples), a folder of them, or module:callable returning a DataLoader.")
@click.option("--model", "model_spec", metavar="SPEC", help="With --bn-calib: file.py:callable or package.module:callable "
              "returning the nn.Module (this runs your code, as it must to run the model).")
@click.option("--bn-batch-size", type=int, default=32, show_default=True, help="Samples per batch for data files.")
@click.option("--bn-batches", type=int, help="Use at most this many batches (default: all with reset, 50 with momentum).")
@click.option("--bn-mode", type=click.Choice(["reset", "momentum"]), default="reset", show_default=True,
              help="reset: update_bn's average over all batches; momentum: the schedule_free recipe, train-mode passes "
              "over up to 50 batches without a reset (batchnorm.md in the documentation).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where to run --bn-calib.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors: no progress, BatchNorm table, summary or warnings.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@handle_errors
@takes_options
def convert(ckpt: Path, out: str, quiet: bool, as_json: bool, options: Options) -> None:
    """Reconstruct x from CKPT and write it to OUT.

    OUT ending in .safetensors is one file; OUT ending in /, an existing
    folder or a name without a suffix is a folder with model.safetensors
    (or, with --max-shard-size and x larger than SIZE, shards and an index).
    From a Keras checkpoint, OUT ending in .weights.h5 or .keras is a file
    Keras loads (model.load_weights, keras.models.load_model).
    """
    from .options import wants_calibration
    from .pipeline import reuse_freed_memory
    from .save import save

    calibrating = wants_calibration(options)
    _status(f"reading {ckpt} and planning x...", not (quiet or as_json))
    with _collector_spared():
        recon = _reconstruction(ckpt, options)
    shifts = None
    if calibrating:
        from .batchnorm import MOMENTUM_BATCHES, calibrate_with

        limit = options.bn_batches or (MOMENTUM_BATCHES if options.bn_mode == "momentum" else 0)
        with _progress(limit, "BatchNorm statistics", not (quiet or as_json), "batches") as update:
            shifts = calibrate_with(recon, options, update)
    total = sum(t.nbytes for t in recon.tensors)
    reuse_freed_memory()  # the process ends with the command: its allocator is ours to tune
    with _progress(total, "writing x", not (quiet or as_json)) as update:
        with warnings.catch_warnings():  # said below in the CLI's words
            warnings.simplefilter("ignore", SfckptWarning)
            paths = save(recon, out, options=options, progress=update, distributed=True)
    _warn(recon.all_warnings(cli_words), quiet)  # after success, so that a failure is one line on stderr
    summary = _convert_summary(ckpt, recon, paths, total)
    if shifts is not None:
        summary["batchnorm"] = [s.as_json() for s in shifts]
    if as_json:
        textout.echo_json(summary)
    elif not quiet:
        _say_written(recon, paths, summary.get("batchnorm"))


def _convert_summary(ckpt: Path, recon: Reconstruction, paths: list[Path], total: int) -> dict[str, Any]:
    """What `convert --json` prints (less the BatchNorm shifts, which only calibration has)."""
    return {
        "version": JSON_VERSION,
        "source": str(ckpt),
        "outputs": [str(p) for p in paths],
        "optimizer_family": recon.family.name,
        "optimizers": [{"key": o.key, "family": o.family.name} for o in recon.optimizers],
        "source_params": recon.source_held,
        "beta": [g.beta for g in recon.groups],
        "tensors": len(recon.tensors),
        "tensors_converted": recon.n_converted,
        "mapping": recon.mapping.as_json(),
        "untrained_parameters": recon.mapping.untrained,
        "bytes": total,
        "warnings": recon.all_warnings(cli_words),
    }


def _say_written(recon: Reconstruction, paths: list[Path], batchnorm: list[dict] | None) -> None:
    """convert's words for people: the BatchNorm table if it calibrated, what it wrote, and hints."""
    from .inspection import hints
    from .tables import bn_table, counted

    if batchnorm is not None:
        textout.echo(bn_table(batchnorm))
    what = "already held x: copied" if recon.source_held == "x" else f"{counted(recon.n_converted, 'tensor')} converted from y to x"
    n_untrained = len(recon.mapping.untrained)
    if n_untrained:
        what += f"; {n_untrained} untrained parameter{'s' if n_untrained != 1 else ''} copied as saved"
    families_used = ", ".join(dict.fromkeys(o.family.name for o in recon.optimizers))
    textout.echo_line(f"wrote {', '.join(map(str, paths))} ({families_used}; {what})", err=True)
    for hint in hints(recon):  # a Lightning prefix kept: the names loading code expects may lack it
        textout.echo_line(f"hint: {hint}", err=True)


@main.command(short_help="Convert each checkpoint a training run writes, once its save is complete.", epilog=DOCS_EPILOG)
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the releases (one per checkpoint, "
              "named after it).")
@click.option("--interval", type=float, default=10.0, show_default=True, help="Seconds between two looks at RUN_DIR.")
@click.option("--once", is_flag=True, help="Convert what is complete now (two looks --interval apart) and stop.")
@click.option("--strip-prefix", metavar="PREFIX", help="Remove PREFIX from weight names (Lightning: model.).")
@click.option("--bn-calib", metavar="DATA", help="Re-estimate BatchNorm statistics at x on DATA, as convert does.")
@click.option("--model", "model_spec", metavar="SPEC", help="With --bn-calib: file.py:callable returning the nn.Module.")
@handle_errors
def watch(run_dir: Path, out: Path, interval: float, once: bool, strip_prefix, bn_calib, model_spec) -> None:
    """Convert every checkpoint written into RUN_DIR, exactly once, when its save is complete.

    Runs until Ctrl-C (exit 130), or with --once until what is there now is converted.
    Releases already in --out are skipped, so a watch can be restarted.
    """
    from .watch import start

    if bool(bn_calib) != bool(model_spec):
        raise OptionConflict(Opt("bn_calib") + " and " + Opt("bn_model") + " go together",
                             "give both: the data, and the code that builds the model", option="bn_model")
    try:
        failures = start(run_dir, out, interval, once, strip_prefix, bn_calib, model_spec,
                         lambda line: textout.echo_line(line, err=True))
    except KeyboardInterrupt:
        # Releases are written whole or not at all: those finished stay, one being written does not appear
        textout.echo("stopped: the releases written so far are complete", err=True)
        sys.exit(130)
    if failures:
        raise InputError(f"{failures} checkpoint{'s' if failures != 1 else ''} in {run_dir} could not be converted "
                         "(see the warnings above)", "fix them and run the watch again: what was written is kept")


@main.command(short_help="Show the per-tensor gap between two weight sets (or y and x).", epilog=DOCS_EPILOG)
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path), required=False)
@load_options
@click.option("--top", type=int, default=20, show_default=True, help="Rows in the table (0: all).")
@click.option("--sort", type=click.Choice(["rel_l2", "max_abs", "mean_abs", "cosine", "name"]), default="rel_l2", show_default=True,
              help="Order of the table's rows: largest gap first, cosine smallest first, or by name.")
@click.option("--plot", type=click.Path(path_type=Path), help="Write a per-layer bar chart of rel_l2 to this .png, .svg or .pdf file (needs sfckpt[plot]).")
@click.option("--force", is_flag=True, help="Replace the --plot file if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@handle_errors
@takes_options
def diff(a: Path, b: Path | None, top: int, sort: str, plot: Path | None, as_json: bool, options: Options) -> None:
    """Show the per-tensor gap between two weight sets.

    With one argument (a training checkpoint): its saved weights against its
    x. With two: any two of safetensors file, sharded index, release folder or
    training checkpoint (whose x is used), matched by name; b is the reference
    (rel_l2 = ||a - b|| / ||b||). Exit 0 when the report was produced; use
    `sfckpt check` to gate a release.
    """
    from .compare import diff_checkpoint, diff_sets
    from .sources import open_weights
    from .tables import diff_table

    if plot is not None:
        from .plot import check_target

        check_target(plot, options.force, [p for p in (a, b) if p is not None])
    _status(f"reading {a}{f' and {b}' if b is not None else ''}...", not as_json)
    if b is None:
        recon = _reconstruction(a, options)
        with _progress(sum(t.nbytes for t in recon.tensors), "comparing", not as_json) as update:
            report = diff_checkpoint(recon, update)
    else:
        make = functools.partial(_reconstruction, options=options)
        set_a, set_b = open_weights(a, make), open_weights(b, make)
        total = sum(r.nbytes for r in {**set_b.tensors, **set_a.tensors}.values())
        with _progress(total, "comparing", not as_json) as update:
            report = diff_sets(set_a, set_b, update)
    if plot is not None:
        from .plot import plot_gap

        plot_gap(report, plot, force=options.force, inputs=[p for p in (a, b) if p is not None])
    if as_json:
        textout.echo_json(report)
    else:
        textout.echo(diff_table(report, top or None, sort))
        if plot is not None:
            textout.echo_line(f"wrote {plot}", err=True)


@main.command(short_help="CI gate: exit 0 if released weights are x, 1 if not, 2 if undecidable.", epilog=DOCS_EPILOG)
@click.argument("weights", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--ckpt", required=True, type=click.Path(path_type=Path), help="The training checkpoint the release was made from.")
@load_options
@click.option("--rtol", type=float, default=0.0, help="Relative tolerance: pass when |released - x| <= atol + rtol·|x|.  [default: 0, exact]")
@click.option("--atol", type=float, default=0.0, help="Absolute tolerance (see --rtol).  [default: 0, exact]")
@click.option("--top", type=click.IntRange(min=0), default=50, show_default=True, help="Findings in the table (0: all).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report on stdout.")
@handle_errors
@takes_options
def check(weights: tuple[Path, ...], ckpt: Path, rtol: float, atol: float, top: int, as_json: bool,
          options: Options) -> None:
    """Exit 0 if WEIGHTS are the checkpoint's x, 1 if not (e.g. they are y), 2 if undecidable.

    WEIGHTS: a safetensors file, a sharded index, a release folder, a
    torch.save'd state dict (.pt/.bin, read without running code), or several
    files that together hold the model. Comparison is exact; a
    release in another dtype is compared with x cast to that dtype. BatchNorm
    statistics that the release's metadata says `convert --bn-calib`
    re-estimated are checked for shape and NaN/Inf only.
    """
    from .compare import check_release, union
    from .sources import released_weights
    from .tables import check_markdown, check_table

    _status(f"reading {ckpt} and planning x...", not as_json)
    released = union(released_weights(w) for w in weights)
    recon = _reconstruction(ckpt, options)
    with _progress(sum(t.nbytes for t in recon.tensors), "checking", not as_json) as update:
        report = check_release(released, recon, rtol=rtol, atol=atol, progress=update)
    if as_json:
        textout.echo_json(report)
    else:
        textout.echo(check_table(report, top or None))
    if textout.github_actions():
        # Workflow commands are read from stdout; in --json mode stdout is the report, so use stderr.
        if not report["passed"]:
            textout.annotate_error("sfckpt check", report["verdict"], err=as_json)
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            with open(summary, "a", encoding="utf-8", errors="backslashreplace") as f:  # a lone surrogate in a name
                f.write(check_markdown(report))
    sys.exit(EXIT_OK if report["passed"] else EXIT_FINDINGS)


if __name__ == "__main__":
    main()
