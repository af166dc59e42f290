"""The paired-differences table of a multi-seed run, against differences computed by hand."""
import numpy as np

from cbst_jax import tables


def test_paired_differences_per_seed_and_round():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.4, 5)
    st = base[:, None] + rng.normal(0, 0.01, (5, 2))
    cbst = st + rng.normal(0.02, 0.02, (5, 2))
    rows = [dict(seed=s, method="source_only", round=None, miou=base[s]) for s in range(5)]
    rows += [dict(seed=s, method=m, round=r, miou=v[s, r]) for s in range(5) for r in range(2)
             for m, v in (("st", st), ("cbst", cbst))]
    rows.append(dict(seed=4, method="cbst_sp", round=0, miou=0.5))  # its baseline pair is complete only here
    lines = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line
             for line in tables.paired_differences_table(rows).splitlines() if line.startswith("| ")}
    for r in range(2):
        d = 100 * (cbst[:, r] - st[:, r])
        cells = [c.strip() for c in lines[("cbst − st", f"r{r}")].strip("|").split("|")]
        assert cells[2] == f"{d.mean():.1f} ± {d.std(ddof=1):.1f}"
        assert cells[3] == f"{int((d > 0).sum())} of 5"
        d = 100 * (st[:, r] - base)
        assert [c.strip() for c in lines[("st − source_only", f"r{r}")].strip("|").split("|")][2] == \
            f"{d.mean():.1f} ± {d.std(ddof=1):.1f}"
    one = [c.strip() for c in lines[("cbst_sp − cbst", "r0")].strip("|").split("|")]
    assert one[2] == f"{100 * (0.5 - cbst[4, 0]):.1f}" and one[3] == ("1 of 1" if 0.5 > cbst[4, 0] else "0 of 1")
    assert tables.paired_differences_table(rows[:5]) == ""


def test_pseudo_label_table_means_over_seeds():
    """Share and precision per class, averaged over seeds by hand; a class no seed selected is "–"."""
    rng = np.random.default_rng(1)
    num_classes, classes = 5, [0, 2, 4]
    selected = rng.integers(0, 100, (3, num_classes)).astype(float)
    selected[:, 4] = 0                                         # never selected
    selected[1, 2] = 0                                         # one seed selects no class-2 pixel
    correct = np.floor(selected * rng.uniform(0.5, 1.0, selected.shape))
    rows = []
    for s in range(3):
        share = selected[s] / selected[s].sum()
        prec = np.where(selected[s] > 0, correct[s] / np.maximum(selected[s], 1), np.nan)
        rows.append(dict(seed=s, method="cbst", round=0, portion=0.2, share=share.tolist(),
                         precision=prec.tolist(), selected_fraction=0.1 * (s + 1)))
    names = [f"c{c}" for c in range(num_classes)]
    line = next(l for l in tables.pseudo_label_table(rows, names, classes).splitlines() if l.startswith("| cbst r0"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:3] == ["0.20", "20.0"]
    share = (selected / selected.sum(1, keepdims=True)).mean(0)
    assert cells[3] == f"{100 * share[0]:.2f} ({100 * np.mean(correct[:, 0] / selected[:, 0]):.0f})"
    keep = [0, 2]                                             # the seeds that selected class 2
    assert cells[4] == f"{100 * share[2]:.2f} ({100 * np.mean(correct[keep, 2] / selected[keep, 2]):.0f})"
    assert cells[5] == "0.00 (–)"
    assert tables.pseudo_label_table([], names, classes) == ""
