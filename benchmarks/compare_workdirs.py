"""Are two runs' results the same? Compares two workdirs of one seed written by the launcher (e.g.
``python -m experiments.synthetic --config=quick --workdir=...`` before and after a change):
``metrics.jsonl`` row by row with the timing fields left out, each ``results.md`` line by line,
and the predictions, pseudo-label PNGs and weights files byte by byte (sha256).

    python -m benchmarks.compare_workdirs /tmp/before /tmp/after

Prints what it compared and what differs; one JSON line last. Exit status 0 when the rows and the
seed's results.md are identical. Files are matched by stage across workdir layouts: a layout-1
workdir (``cbst_jax.workdir.LAYOUT`` before 2: ``predictions/source_only.npz``,
``pseudo_labels/<method>/round_<r>/``) is compared under the names layout 2 gives the same files.
"""
import argparse
import glob
import hashlib
import json
import os
import re
import sys

TIMING_FIELDS = ("wall_s",)
FILES = ("predictions/*.npz", "pseudo_labels/**/*.png", "models/*.npz")


def rows(seed_dir):
    with open(os.path.join(seed_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS} for line in f]


def differing_lines(a, b):
    with open(a) as fa, open(b) as fb:
        la, lb = fa.read().splitlines(), fb.read().splitlines()
    out = [(x, y) for x, y in zip(la, lb) if x != y]
    return out + [(f"{len(la)} lines", f"{len(lb)} lines")] if len(la) != len(lb) else out


def layout(seed_dir):
    with open(os.path.join(seed_dir, "ledger.json")) as f:
        return json.load(f).get("version", 1)


def layout_2_name(relative):
    """A layout-1 file's name in layout 2 (every stage file named by the stage's slug)."""
    relative = re.sub(r"^predictions/source_only\.npz$", "predictions/source.npz", relative)
    return re.sub(r"^pseudo_labels/(\w+)/round_(\d+)/", r"pseudo_labels/\1_r\2/", relative)


def digests(seed_dir, pattern):
    rename = layout_2_name if layout(seed_dir) == 1 else (lambda name: name)
    return {rename(os.path.relpath(p, seed_dir)): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in sorted(glob.glob(os.path.join(seed_dir, pattern), recursive=True))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--seed", default="seed_0")
    args = parser.parse_args(argv)
    a, b = os.path.join(args.before, args.seed), os.path.join(args.after, args.seed)
    ra, rb = rows(a), rows(b)
    summary = dict(rows=[len(ra), len(rb)], rows_identical=ra == rb, timing_fields_left_out=list(TIMING_FIELDS))
    print(f"metrics.jsonl: {len(ra)} / {len(rb)} rows, identical without {TIMING_FIELDS}: {ra == rb}")
    for name, (x, y) in (("seed results.md", (a, b)), ("results.md", (args.before, args.after))):
        diff = differing_lines(os.path.join(x, "results.md"), os.path.join(y, "results.md"))
        summary[f"{name} differing lines"] = len(diff)
        print(f"{name}: " + ("identical" if not diff else f"{len(diff)} differing lines, e.g. {diff[:3]}"))
    for pattern in FILES:
        da, db = digests(a, pattern), digests(b, pattern)
        same = sum(db.get(k) == v for k, v in da.items())
        summary[pattern] = [len(da), len(db), same]
        print(f"{pattern}: {len(da)} / {len(db)} files, {same} byte-identical")
    print(json.dumps(summary))
    return 0 if summary["rows_identical"] and not summary["seed results.md differing lines"] else 1


if __name__ == "__main__":
    sys.exit(main())
