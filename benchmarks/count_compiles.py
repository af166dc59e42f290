"""Counts the XLA programs an experiment compiles, per stage of the round loop, and shows that a
second run of the same config with jax's persistent compilation cache compiles none of them.

    python -m benchmarks.count_compiles                      # the quick synthetic run, twice
    python -m benchmarks.count_compiles --runs 2 -- experiments.synthetic --config=quick \\
        --config.methods=source_only,cbst

Each run is a fresh process and a fresh workdir sharing one cache folder (``--cache``, default a
new temporary folder, so run 1 starts cold). In the child, before anything compiles:

    jax.config.update("jax_compilation_cache_dir", CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)   # default 1.0 s
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)   # every entry, any size

and two ``jax.monitoring`` listeners: every backend compilation request
(``/jax/core/compile/backend_compile_duration``, which fires for programs compiled *and* for programs
loaded from the persistent cache) is recorded with its function name and the round-loop stage on
the Python stack (the innermost ``cbst_jax.self_training.RoundLoop`` method and its ``stage``); a
``/jax/compilation_cache/cache_hits`` event just before it on the same thread marks it loaded. A
program is "compiled" when it was not a hit. Prints one table per run and a JSON summary (also
``$OUT/compiles.json``); exit status 1 when a run after the first compiled anything.
"""
import argparse
import collections
import json
import os
import runpy
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RUN = ["experiments.synthetic", "--config=quick", "--config.methods=source_only,cbst"]
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
HIT_EVENT = "/jax/compilation_cache/cache_hits"
LOOP_FILE = os.path.join("cbst_jax", "self_training.py")


def enable_cache(cache_dir: str) -> None:
    """jax's persistent compilation cache in ``cache_dir``, for every program (the calls
    ``cbst_jax.cli.run`` needs; must run before the first compilation of the process)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def loop_stage(frame) -> str:
    """'<method> <stage key>' of the innermost round-loop method on the stack, else 'outside loop'."""
    while frame is not None:
        code = frame.f_code
        if code.co_filename.endswith(LOOP_FILE):
            stage = frame.f_locals.get("stage")
            key = getattr(stage, "key", None)
            if code.co_name == "source_model":
                key = "source"
            return f"{code.co_name} {key}" if key else code.co_name
        frame = frame.f_back
    return "outside loop"


class Recorder:
    """The monitoring listeners: one record per backend compilation request."""

    def __init__(self):
        self.records, self.hit_pending = [], threading.local()

    def on_event(self, event, **kwargs):
        if event == HIT_EVENT:
            self.hit_pending.value = True

    def on_duration(self, event, duration, **kwargs):
        if event != COMPILE_EVENT:
            return
        hit = getattr(self.hit_pending, "value", False)
        self.hit_pending.value = False
        self.records.append(dict(fun=str(kwargs.get("fun_name", "?")), seconds=round(duration, 4), hit=hit,
                                 stage=loop_stage(sys._getframe(1)), thread=threading.current_thread().name))

    def install(self):
        from jax import monitoring

        monitoring.register_event_listener(self.on_event)
        monitoring.register_event_duration_secs_listener(self.on_duration)


def child(record_path: str, cache_dir: str, command) -> int:
    """Runs ``python -m command...`` in this process with the cache and the listeners on."""
    enable_cache(cache_dir)
    recorder = Recorder()
    recorder.install()
    sys.argv = [command[0]] + list(command[1:])
    status = 0
    t0 = time.time()
    try:
        runpy.run_module(command[0], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        with open(record_path, "w") as f:
            json.dump(dict(status=status, wall_s=round(time.time() - t0, 1), records=recorder.records), f)
    return status


def run_child(module: str, record: str, cache: str, command, *, timeout: float, env_extra=None) -> dict:
    """Runs ``python -m module --child record --cache cache -- command...`` from the repository
    root and returns the record it wrote; a run that wrote none, or exited non-zero, ends this
    process with a one-line error after the child's last stderr lines."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
               **(env_extra or {}))
    cmd = [sys.executable, "-m", module, "--child", record, "--cache", cache, "--", *command]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if not os.path.exists(record):
        print(res.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"error: {command[0]} wrote no record (exit {res.returncode})")
    with open(record) as f:
        data = json.load(f)
    if data["status"] != 0:
        print(res.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"error: {' '.join(command)} exited with status {data['status']}")
    return data


def summarize(records):
    """Per stage: compilation requests, programs compiled and programs loaded from the cache."""
    stages = collections.OrderedDict()
    for r in records:
        s = stages.setdefault(r["stage"], dict(requests=0, compiled=0, loaded=0, compile_s=0.0, functions=[]))
        s["requests"] += 1
        s["loaded" if r["hit"] else "compiled"] += 1
        s["compile_s"] = round(s["compile_s"] + r["seconds"], 2)
        s["functions"].append(r["fun"])
    for s in stages.values():
        s["functions"] = dict(collections.Counter(s["functions"]))
    return stages


def print_table(run, summary, wall_s):
    print(f"run {run}: {sum(s['requests'] for s in summary.values())} programs, "
          f"{sum(s['compiled'] for s in summary.values())} compiled, "
          f"{sum(s['loaded'] for s in summary.values())} from the cache, wall {wall_s} s")
    print(f"  {'stage':<34} {'programs':>8} {'compiled':>8} {'loaded':>7} {'seconds':>8}")
    for name, s in summary.items():
        print(f"  {name:<34} {s['requests']:>8} {s['compiled']:>8} {s['loaded']:>7} {s['compile_s']:>8}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--cache", default="", help="cache folder (default: a fresh temporary one)")
    parser.add_argument("--workdir", default="", help="parent of the runs' workdirs (default: temporary)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    command = command or DEFAULT_RUN
    if args.child:
        return child(args.child, args.cache, command)

    scratch = tempfile.mkdtemp(prefix="count_compiles_")
    cache = args.cache or os.path.join(scratch, "jax_cache")
    parent = args.workdir or scratch
    runs = []
    for run in range(1, args.runs + 1):
        # the launcher's --compilation_cache defaults to $CBST_JAX_COMPILATION_CACHE: point it here too
        data = run_child("benchmarks.count_compiles", os.path.join(scratch, f"run{run}.json"), cache,
                         [*command, f"--workdir={os.path.join(parent, f'run{run}')}"], timeout=args.timeout,
                         env_extra={"CBST_JAX_COMPILATION_CACHE": cache})
        summary = summarize(data["records"])
        print_table(run, summary, data["wall_s"])
        runs.append(dict(run=run, wall_s=data["wall_s"], programs=len(data["records"]),
                         compiled=sum(not r["hit"] for r in data["records"]),
                         loaded=sum(r["hit"] for r in data["records"]), stages=summary))
    result = dict(command=command, cache=cache, runs=runs,
                  later_runs_compiled=sum(r["compiled"] for r in runs[1:]),
                  cache_files=len(os.listdir(cache)) if os.path.isdir(cache) else 0)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "compiles.json"), "w") as f:
            json.dump(result, f, indent=1)
    return 1 if result["later_runs_compiled"] else 0


if __name__ == "__main__":
    sys.exit(main())
