"""Stops the same small run by a signal many times and reports how each try ended (issue 22 item 6).

Each try copies a finished small run (tests/test_reliability.py's SMALL settings), replaces it with
``--fresh``, stops that with SIGTERM once source training has a checkpoint (paused by SIGSTOP
first, as the test does while a second run is refused), resumes it without ``--fresh`` and sends
SIGINT the moment the moved-aside run is deleted (the source model exists), then waits up to 90 s.
A try that hangs is dumped with py-spy (if installed) and killed.

    python tools/signal_stop_loop.py --tries 15 --scratch /tmp/sigloop
"""
import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.test_reliability import SMALL  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=15)
    parser.add_argument("--scratch", default="/tmp/sigloop")
    args = parser.parse_args()
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2",
               XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=ROOT,
               CBST_JAX_COMPILATION_CACHE=os.path.join(args.scratch, "xla"))
    launch = [sys.executable, "-m", "experiments.synthetic", *SMALL]
    base = os.path.join(args.scratch, "finished")
    if not os.path.exists(os.path.join(base, "seed_0", "ledger.json")):
        subprocess.run([*launch, f"--workdir={base}"], cwd=ROOT, env=env, check=True, capture_output=True)
    for k in range(args.tries):
        work = os.path.join(args.scratch, f"try{k}")
        for old in [work, *glob.glob(work + ".replaced-*")]:
            shutil.rmtree(old, ignore_errors=True)
        shutil.copytree(base, work)
        with open(f"{work}.first.err", "w") as err:
            first = subprocess.Popen([*launch, f"--workdir={work}", "--fresh"], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=err)
        while not _has_checkpoint(work):
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)
        time.sleep(1.0)
        first.send_signal(signal.SIGTERM)
        first.send_signal(signal.SIGCONT)
        first.wait(timeout=90)
        (aside,) = glob.glob(work + ".replaced-*")
        t0 = time.time()
        with open(f"{work}.second.err", "w") as err:
            second = subprocess.Popen([*launch, f"--workdir={work}"], cwd=ROOT, env=env,
                                      stdout=subprocess.DEVNULL, stderr=err)
        while os.path.exists(aside):
            time.sleep(0.05)
        second.send_signal(signal.SIGINT)
        try:
            rc = second.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.system(f"py-spy dump --pid {second.pid} > {work}.hang.txt 2>&1")
            second.kill()
            print(json.dumps({"try": k, "first_rc": first.returncode, "second": "hung > 90 s"}), flush=True)
            continue
        last = open(f"{work}.second.err").read().replace("\r", "\n").strip().splitlines()[-1]
        print(json.dumps({"try": k, "first_rc": first.returncode, "second_rc": rc,
                          "second_s": round(time.time() - t0, 1), "last_line": last[:120]}), flush=True)


def _has_checkpoint(work: str) -> bool:
    try:
        with open(os.path.join(work, "seed_0", "ledger.json")) as f:
            return bool(json.load(f)["checkpoints"])
    except (OSError, ValueError):
        return False


if __name__ == "__main__":
    main()
