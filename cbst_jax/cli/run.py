"""The command line of every experiment:

    python -m cbst_jax.cli.run --config=experiments/configs/synthetic.py[:variant] [--config.<key>=<value> ...]
                               [--workdir=DIR] [--seeds=0,1,2] [--fresh]

``experiments/<name>.py`` are one-line launchers of this with their own config as the default,
so ``python -m experiments.gta5_cityscapes --config.target.root=...`` works, and there
``--config=<variant>`` alone picks a variant of that config (``get_config("<variant>")``, e.g.
``python -m experiments.synthetic --config=quick``). The run itself is the library's
(``cbst_jax.self_training.run_experiment``): each seed in ``<workdir>/seed_<s>``, with several
seeds the tables report mean ± std.

Every input is checked before the workdir is touched (``cbst_jax.preflight``); a workdir is
resumed or replaced (``--fresh``) only if it carries our run marker, and only by one run at a
time (``cbst_jax.workdir.prepare``: an exclusive lock, released by the kernel when the process
ends however it ends). A user's mistake ends with a one-line ``error: ...`` naming the key, file
or value and what was expected, and exit status 2 (``--debug`` shows the traceback instead).
Ctrl-C (SIGINT) and SIGTERM stop the run with one line, exit status 130 / 143, the workdir
resumable.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import sys
import threading

from cbst_jax import config_lib

EXIT_USAGE = 2
# Seconds a run stopped by a signal may take to unwind (close its files, data workers and
# checkpoint manager) before it is ended as it stands (:class:`StopRequest`).
STOP_GRACE_S = 60


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived: the run unwinds (closing what it holds) and exits 128 + signum.
    A BaseException, as KeyboardInterrupt, so that no ``except Exception`` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopRequest:
    """The handler of SIGINT and SIGTERM. The first signal raises :class:`Stopped` in the main
    thread, so the run unwinds and closes what it holds, and arms a watchdog that ends the process
    ``STOP_GRACE_S`` later whatever it is doing; a second signal ends it at once. The watchdog is
    needed: the exception lands wherever the main thread is, so it can be swallowed (raised inside
    a garbage-collection callback, which Python reports as "Exception ignored" and drops), stop a
    library half-way (a thread pool's worker started but not yet registered for shutdown, which
    the interpreter's exit then waits for), or wait for a long compilation to end. Every file of a
    run is written atomically, so ending the process at any point loses nothing. Every way out is
    the same one line and exit status 128 + signum (:func:`_end_stopped`)."""

    def __init__(self):
        self.signum = None

    def install(self) -> "StopRequest":
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self.handle)
        return self

    def handle(self, signum, frame) -> None:
        if self.signum is not None:
            self.end()
        self.signum = signum
        watchdog = threading.Timer(STOP_GRACE_S, self.end)
        watchdog.daemon = True
        watchdog.start()
        raise Stopped(signum)

    def end(self) -> None:
        _end_stopped(Stopped(self.signum))


def _end_stopped(e: BaseException) -> None:
    """The one line of a stopped run, then the process ends at once (``os._exit``), so nothing
    the signal interrupted can hold the exit up."""
    status = _stopped(e)
    sys.stdout.flush()
    os._exit(status)


HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")
FLAG_HELP = {  # the launcher's own flags (defined for absl in launch(), listed by --help)
    "workdir": "output folder (checkpoints, pseudo-labels, metrics, plots); required for real datasets, the "
               "embedded synthetic pair defaults to runs/<experiment>",
    "seeds": "comma-separated seeds, each in <workdir>/seed_<s>; the tables report mean ± std",
    "fresh": "start over: an existing run of ours in --workdir is moved aside, and deleted once the new run "
             "has started",
    "debug": "show the traceback of an error instead of its one-line message",
    "compilation_cache": "folder of jax's persistent compilation cache (a rerun or resume compiles nothing); "
                         "empty: off; default $CBST_JAX_COMPILATION_CACHE or ~/.cache/cbst_jax/xla",
}


def config_file(spec: str) -> str:
    """The file of ``spec`` (``path/to/config.py[:variant]``); ConfigError when there is none."""
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
        raise config_lib.ConfigError(f"--config={spec!r}: expected a config file "
                                     f"(e.g. experiments/configs/synthetic.py)")
    return path


def config_module(spec: str):
    """The config file of ``spec``, imported, for ``--help``: its ``get_config``, ``VARIANTS`` and
    docstring."""
    path = config_file(spec)
    module_spec = importlib.util.spec_from_file_location("_cbst_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_config(spec: str):
    """``path/to/config.py[:variant]`` -> that file's ``get_config()`` / ``get_config(variant)``, loaded
    as ``--config`` loads it (ml_collections' config-file parser), to check it before absl does."""
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser

    config_file(spec)
    try:
        return ConfigFileFlagParser("config", lock_config=False).parse(spec)
    except KeyError as e:
        raise config_lib.ConfigError(f"--config={spec!r}: unknown variant {e.args[0]}") from None


def _config_spec(argv, default: str | None):
    """The ``--config`` value of ``argv`` (a bare variant name completed with ``default``'s file);
    ``argv`` is rewritten with that ``--config`` first, as ml_collections wants it before any
    ``--config.<key>`` override."""
    spec = default
    for arg in [a for a in argv[1:] if a.startswith("--config=")]:
        spec = arg.split("=", 1)[1]
        if default and not spec.endswith(".py") and ".py:" not in spec:
            spec = f"{default.partition(':')[0]}:{spec}"
        argv.remove(arg)
    if spec is None:
        raise config_lib.ConfigError("--config is required: a config file, e.g. experiments/configs/synthetic.py")
    argv.insert(1, f"--config={spec}")
    return spec


def launch(default_config: str | None = None) -> None:
    """Parses the command line (``default_config``: the launcher's config file) and runs."""
    from absl import app, flags
    from ml_collections import config_flags

    stop = StopRequest().install()
    argv = list(sys.argv)
    try:
        if any(a in HELP_FLAGS for a in argv[1:]):
            print(help_text([a for a in argv if a not in HELP_FLAGS], default_config))
            sys.exit(0)
        spec = _config_spec(argv, default_config)
        bad = config_lib.unknown_override(argv[1:], load_config(spec))
        if bad:
            raise config_lib.ConfigError(bad)
    except config_lib.ConfigError as e:  # before absl, which would raise a traceback
        _fail(e)
    sys.argv = argv  # ml_collections reads the config file's name from sys.argv when defining the flag
    config_flags.DEFINE_config_file("config", spec, "the experiment's config file[:variant]", lock_config=True)
    flags.DEFINE_string("workdir", None, FLAG_HELP["workdir"])
    flags.DEFINE_string("seeds", None, FLAG_HELP["seeds"])
    flags.DEFINE_bool("fresh", False, FLAG_HELP["fresh"])
    flags.DEFINE_bool("debug", False, FLAG_HELP["debug"])
    flags.DEFINE_string("compilation_cache", default_compilation_cache(), FLAG_HELP["compilation_cache"])

    def parse(args):
        try:
            return flags.FLAGS(args)
        except (flags.Error, ValueError, TypeError) as e:  # e.g. --config.seed=abc
            _fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)

    def main(_):
        from absl import logging
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
        use_compilation_cache(flags.FLAGS.compilation_cache)
        name = os.path.splitext(os.path.basename(spec.partition(":")[0]))[0]
        try:
            workdir = flags.FLAGS.workdir or default_workdir(flags.FLAGS.config, name)
        except config_lib.ConfigError as e:
            _fail(e)
        print(f"workdir: {os.path.abspath(workdir)}"
              + ("" if flags.FLAGS.workdir else " (the embedded pair's default; --workdir=DIR to choose)"), flush=True)
        status = run_command(flags.FLAGS.config, workdir, flags.FLAGS.seeds, flags.FLAGS.fresh, flags.FLAGS.debug)
        if stop.signum is not None:  # a stop whose exception was swallowed on the way, the run done meanwhile
            stop.end()
        return status

    try:
        app.run(main, flags_parser=parse)
    except (Stopped, KeyboardInterrupt) as e:  # before run_command: while parsing or importing
        _end_stopped(e)


def default_workdir(config, name: str) -> str:
    """``runs/<name>`` for a run on the embedded synthetic pair; a run on real datasets (long, and
    writing checkpoints and pseudo-labels) must name its workdir: ConfigError."""
    if all(str(config[side].name).startswith("synthetic/") for side in ("source", "target")):
        return os.path.join("runs", name)
    config_lib.validate(config)  # a missing dataset root is the first thing to fix
    raise config_lib.ConfigError(f"--workdir is required for a run on real datasets (it holds the run's checkpoints, "
                                 f"pseudo-labels and results), e.g. --workdir=runs/{name}; only the embedded "
                                 f"synthetic pair defaults to runs/<experiment>")


def help_text(argv, default_config: str | None) -> str:
    """``--help``: usage, the config file's variants, the launcher's flags and every config key with
    its default (of the chosen variant) and its meaning (``config_lib.KEY_HELP``)."""
    import ml_collections

    spec = None
    if default_config or any(a.startswith("--config=") for a in argv[1:]):
        spec = _config_spec(list(argv), default_config)
    path, _, variant = (spec or "").partition(":")
    module = config_module(spec) if spec else None
    if path and not os.path.relpath(path).startswith(".."):
        path = os.path.relpath(path)
    config = load_config(spec) if spec else config_lib.base_config()
    launcher = (f"python -m experiments.{os.path.splitext(os.path.basename(default_config))[0]} [--config=<variant>]"
                if default_config else "python -m cbst_jax.cli.run --config=<file>.py[:<variant>]")
    lines = [f"usage: {launcher} [--config.<key>=<value> ...] [--workdir=DIR] [--seeds=0,1,2] [--fresh] [--debug] "
             f"[--compilation_cache=DIR]", ""]
    if module is not None:
        doc = (module.__doc__ or "").strip().split("\n\n")[0]
        lines += [doc, ""]
        variants = getattr(module, "VARIANTS", {})
        default = module.get_config().variant
        lines.append(f"--config=<variant>: a variant of {path} (default: "
                     f"{default or 'none, the recipe as the file sets it'}; or --config=<file>.py[:<variant>]):")
        for name, change in variants.items():
            summary = ((change.__doc__ or "").strip().splitlines() or [""])[0]
            lines.append(f"  {name:<16} {summary}")
        if not variants:
            lines.append("  (this file has none)")
        lines.append("")
    lines.append("flags:")
    for name, text in FLAG_HELP.items():
        lines.append(f"  --{name:<18} {text}")

    def leaves(node, prefix=""):
        for key in node.keys():
            if isinstance(node[key], ml_collections.ConfigDict):
                yield from leaves(node[key], f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", node[key]

    values = dict(leaves(config))
    shown = {k: f"{k} = {values[k]!r}" for k in config_lib.KEY_HELP if k in values}
    width = max(map(len, shown.values()))
    where = f"{path}{':' + variant if variant else ''}" if path else "the schema (cbst_jax.config_lib.base_config)"
    lines += ["", f"config keys (--config.<key>=<value>), with the defaults of {where}:"]
    lines += [f"  {shown[k]:<{width}}  {config_lib.KEY_HELP[k]}" for k in shown]
    lines += [f"  {k} = {v!r}" for k, v in values.items() if k not in config_lib.KEY_HELP]
    return "\n".join(lines)


def default_compilation_cache() -> str:
    return os.environ.get("CBST_JAX_COMPILATION_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "cbst_jax", "xla"))


def use_compilation_cache(directory: str) -> None:
    """jax's persistent compilation cache in ``directory``, for every program however fast it
    compiled (jax's defaults skip programs under 1 s, which are most of a small run's)."""
    if not directory:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.abspath(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _fail(message) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def _stopped(e: BaseException) -> int:
    """The line and exit status of a run stopped by a signal (128 + its number)."""
    signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
    name = signal.Signals(signum).name + (" (Ctrl-C)" if signum == signal.SIGINT else "")
    print(f"stopped by {name}: everything finished so far is kept; rerun the same command to resume",
          file=sys.stderr, flush=True)
    return 128 + signum


def _user_errors() -> tuple:
    from cbst_jax.checkpointing import CheckpointError
    from cbst_jax.data import DatasetError
    from cbst_jax.errors import RunError
    from cbst_jax.models import WeightMismatchError
    from cbst_jax.pseudo_label_store import PseudoLabelError

    return (config_lib.ConfigError, RunError, DatasetError, WeightMismatchError, CheckpointError, PseudoLabelError)


def run_command(config, workdir: str, seeds_text: str | None, fresh: bool, debug: bool = False) -> int:
    """Checks every input (``cbst_jax.preflight``), only then creates, resumes or replaces the
    workdir, and runs every seed. A user's mistake or a broken input is one line and exit
    status 2, an unexpected failure one line and exit status 1; ``debug`` shows tracebacks."""
    from cbst_jax import workdir as workdir_lib
    from cbst_jax.preflight import check_batches, preflight

    user_errors = _user_errors()
    lock = None
    try:
        seeds = config_lib.parse_seeds(seeds_text) if seeds_text else [config.seed]
        preflight(config)
        if not config.distributed:
            check_batches(config)
        _initialize_distributed(config)
        run_dir, lock, replaced = workdir_lib.prepare(os.path.abspath(workdir), fresh)
        if config.distributed:  # the global device count exists only once every process has joined
            check_batches(config)
        from cbst_jax import self_training

        self_training.run_experiment(config, run_dir, seeds,
                                     on_started=lambda: workdir_lib.remove_replaced(run_dir, replaced))
        return 0
    except (Stopped, KeyboardInterrupt) as e:
        if debug:
            raise
        if lock is not None:
            lock.release()
        _end_stopped(e)
    except user_errors as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        from cbst_jax.checkpointing import CheckpointError
        if isinstance(e, CheckpointError):  # orbax threads of a failed write would keep reporting it
            os._exit(EXIT_USAGE)
        return EXIT_USAGE
    except OSError as e:  # a full disk, a permission, a file that vanished
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - the last resort: one line, the traceback behind --debug
        if debug:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: internal error ({type(e).__name__}: {first[:300]}); rerun with --debug for the traceback",
              file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            lock.release()


def _initialize_distributed(config) -> None:
    import jax

    from cbst_jax import sharding as shd

    if config.distributed:
        kwargs = {}
        if config.coordinator_address:
            kwargs = dict(coordinator_address=config.coordinator_address, num_processes=config.num_processes,
                          process_id=config.process_id)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU backend only; no-op elsewhere
        shd.maybe_initialize_distributed(True, **kwargs)


if __name__ == "__main__":
    launch()

