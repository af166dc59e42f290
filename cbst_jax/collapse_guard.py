"""The collapse guard: after each self-training round, four training-side signals that the run
is collapsing, each a pure function of what the run already records, and one verdict over them.

Users of the peer implementations report runs that collapse silently (CRST's CBST/MRKLD falling to
~2.5 mIoU in round 2, a seed of MIC losing the "train" class); nothing here needs the evaluation
split to notice. A round r of a method is judged on:

* ``unselected``: classes the model still predicts on the target (their share of the labelling
  pass's argmax pixel counts, ``predicted``, at least ``min_share``; the argmax of the scores the
  thresholds rank: q·p for the -SP methods, every ``select_subsample``-th pixel of each class) of
  which no pixel was selected;
* ``share_drop``: classes whose share of the selected pixels fell below ``share_fraction`` times
  their share in round r-1 of the same method (classes with a share of at least ``min_share`` in
  round r-1; round 0 has no previous round);
* ``loss_rise``: the round's training loss, as the logged means of ``log_every`` steps (the
  trainer's windows): a window is *risen* when it lies above its best earlier window by more than
  ``loss_rise`` of that window's magnitude, ``m_i - min(m_1..m_{i-1}) > loss_rise * |min(...)|``;
  the check fires when ``loss_windows`` consecutive windows are risen (0: off);
* ``entropy_drop``: the mean per-pixel entropy of the labelling pass's probabilities fell below
  ``entropy_fraction`` times round 0's (the source model's predictions; 0: off).

Round r's labels are made by the model of the stage before it, so its labelling signals describe
that model's predictions on the target, and its loss signal its own training.

Evaluation never reaches the guard: a round's labelling inputs are built only from the
pseudo-label rows the run ledger records (:meth:`Labelling.from_row` refuses any other row), and
its loss input is a list of the trainer's window means.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from cbst_jax.errors import RunError


class CollapseStop(RunError):
    """The run stopped after a round whose checks fired (``self_training.on_collapse=stop``)."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """The guard's thresholds (``config.self_training.collapse_guard``, read by
    ``cbst_jax.settings.guard``; meanings above)."""
    min_share: float
    share_fraction: float
    loss_rise: float
    loss_windows: int
    entropy_fraction: float


@dataclasses.dataclass(frozen=True)
class Labelling:
    """What one round's labelling pass found, as its pseudo-label row records it: per class the
    pixels predicted (argmax; None in rows written before they were recorded) and the share of
    the selected pixels, and the mean prediction entropy (nats; None likewise)."""
    method: str
    round: int
    predicted: tuple | None
    share: tuple
    mean_entropy: float | None

    @classmethod
    def from_row(cls, row: dict) -> "Labelling":
        """The guard's only way in for labelling statistics: a pseudo-label row, nothing else."""
        if not isinstance(row, dict) or row.get("kind") != "pseudo_labels":
            kind = row.get("kind") if isinstance(row, dict) else type(row).__name__
            raise TypeError(f"the collapse guard reads pseudo-label rows only, not {kind!r}")
        predicted = row.get("predicted")
        return cls(str(row["method"]), int(row["round"]),
                   None if predicted is None else tuple(int(n) for n in predicted),
                   tuple(float(s) for s in row["share"]),
                   None if row.get("mean_entropy") is None else float(row["mean_entropy"]))


@dataclasses.dataclass(frozen=True)
class LossRise:
    """``stretch``: the most consecutive risen windows; ``peak``: the largest excess of a window
    over its best earlier window, relative to that window's magnitude (0 when none lies above);
    ``windows``: how many window means there were."""
    stretch: int
    peak: float
    windows: int


@dataclasses.dataclass(frozen=True)
class Health:
    """One round's signals and which checks fired (None: not judged, e.g. round 0's share drop)."""
    method: str
    round: int
    unselected: list | None          # [(class, predicted share)]
    share_drops: list | None         # [(class, previous share, share)] below share_fraction x previous
    lowest_share_ratio: tuple | None  # (class, share / previous share) of the judged classes
    loss: LossRise | None
    mean_entropy: float | None
    entropy_ratio: float | None      # / round 0's
    fired: tuple
    settings: Settings


# ------------------------------------------------------------------------------------ signals
def predicted_shares(predicted: Sequence[int]) -> np.ndarray:
    """Each class's share of the predicted pixels (zeros when none)."""
    counts = np.asarray(predicted, np.float64)
    total = counts.sum()
    return counts / total if total > 0 else np.zeros_like(counts)


def unselected_classes(predicted: Sequence[int], share: Sequence[float], min_share: float) -> list:
    """[(class, predicted share)] of the classes predicted on at least ``min_share`` of the
    pixels (and on one at least) of which no pixel was selected (``share`` 0)."""
    shares = predicted_shares(predicted)
    return [(c, float(shares[c])) for c in range(len(shares))
            if shares[c] >= min_share and shares[c] > 0 and share[c] <= 0]


def share_ratios(share: Sequence[float], previous: Sequence[float], min_share: float) -> dict:
    """{class: share / previous share} of the classes whose previous share is at least
    ``min_share`` (and above 0)."""
    return {c: float(share[c]) / float(previous[c]) for c in range(len(previous))
            if previous[c] >= min_share and previous[c] > 0}


def share_drops(share: Sequence[float], previous: Sequence[float], fraction: float, min_share: float) -> list:
    """[(class, previous share, share)] of the judged classes whose share fell below
    ``fraction`` times the previous one."""
    return [(c, float(previous[c]), float(share[c])) for c, r in share_ratios(share, previous, min_share).items()
            if r < fraction]


def loss_rise(windows: Sequence[float], rise: float) -> LossRise:
    """The loss windows' sustained rise: window i (from the second) is risen when
    ``m_i - b > rise * |b|`` with ``b = min(m_1..m_{i-1})``."""
    best, run, stretch, peak = math.inf, 0, 0, 0.0
    for i, m in enumerate(float(w) for w in windows):
        if i > 0:
            excess = (m - best) / abs(best) if best != 0 else (math.inf if m > best else 0.0)
            peak = max(peak, excess)
            run = run + 1 if excess > rise else 0
            stretch = max(stretch, run)
        best = min(best, m)
    return LossRise(stretch, peak, len(windows))


def entropy_ratio(mean_entropy: float | None, baseline: float | None) -> float | None:
    """``mean_entropy / baseline``; None where either is unknown or the baseline is 0."""
    if mean_entropy is None or baseline is None or baseline <= 0:
        return None
    return float(mean_entropy) / float(baseline)


# ------------------------------------------------------------------------------------ verdict
def verdict(pl_rows: Sequence[dict], method: str, round_idx: int, loss_windows: Sequence[float] | None,
            settings: Settings) -> Health:
    """The health of round ``round_idx`` of ``method`` from the run's pseudo-label rows (every
    row must be one: :meth:`Labelling.from_row`) and the round's logged loss-window means (None:
    not recorded)."""
    rounds = {(lab.method, lab.round): lab for lab in map(Labelling.from_row, pl_rows)}
    current = rounds[(method, round_idx)]
    previous = rounds.get((method, round_idx - 1))
    first = rounds.get((method, 0))
    s = settings
    fired = []

    unselected = None
    if current.predicted is not None:
        unselected = unselected_classes(current.predicted, current.share, s.min_share)
        if unselected:
            fired.append("unselected")

    drops = lowest = None
    if previous is not None:
        ratios = share_ratios(current.share, previous.share, s.min_share)
        drops = share_drops(current.share, previous.share, s.share_fraction, s.min_share)
        if ratios:
            c = min(ratios, key=lambda k: (ratios[k], k))
            lowest = (c, ratios[c])
        if drops:
            fired.append("share_drop")

    loss = None
    if loss_windows is not None:
        loss = loss_rise(loss_windows, s.loss_rise)
        if s.loss_windows > 0 and loss.stretch >= s.loss_windows:
            fired.append("loss_rise")

    ratio = entropy_ratio(current.mean_entropy, first.mean_entropy if first else None) if round_idx > 0 else None
    if ratio is not None and ratio < s.entropy_fraction:
        fired.append("entropy_drop")

    return Health(method, round_idx, unselected, drops, lowest, loss, current.mean_entropy, ratio, tuple(fired), s)


def warning_line(stage_key: str, health: Health, class_names: Sequence[str]) -> str | None:
    """The one line a fired check writes to stderr and metrics.jsonl (None: nothing fired)."""
    if not health.fired:
        return None
    s, parts = health.settings, []
    if "unselected" in health.fired:
        parts.append("unselected: " + ", ".join(f"{class_names[c]} predicted on {100 * p:.2f} % of the target, "
                                               f"no pixel selected" for c, p in health.unselected))
    if "share_drop" in health.fired:
        parts.append("share_drop: " + ", ".join(
            f"{class_names[c]} {100 * prev:.2f} % -> {100 * now:.2f} % of the pseudo-labels" for c, prev, now in
            health.share_drops) + f" (< {s.share_fraction:g} x round {health.round - 1})")
    if "loss_rise" in health.fired:
        peak = health.loss.peak
        parts.append(f"loss_rise: {health.loss.stretch} consecutive loss windows above (1 + {s.loss_rise:g}) x "
                     f"the best earlier window (peak " + (f"+{100 * peak:.0f} %" if peak < 10 else f"{1 + peak:.3g} x")
                     + ")")
    if "entropy_drop" in health.fired:
        parts.append(f"entropy_drop: mean prediction entropy {health.mean_entropy:.4f} nats = "
                     f"{health.entropy_ratio:.3f} x round 0's (< {s.entropy_fraction:g})")
    return f"warning: collapse guard, stage {stage_key}: " + "; ".join(parts)


def health_row(seed: int, health: Health, warning: str | None) -> dict:
    """The round's health row (recorded through the run ledger, reported in results.md)."""
    loss = health.loss
    return {"kind": "health", "seed": seed, "method": health.method, "round": health.round,
            "unselected": None if health.unselected is None else [list(u) for u in health.unselected],
            "share_drops": None if health.share_drops is None else [list(d) for d in health.share_drops],
            "lowest_share_ratio": None if health.lowest_share_ratio is None else list(health.lowest_share_ratio),
            "loss_windows": None if loss is None else loss.windows,
            "loss_stretch": None if loss is None else loss.stretch,
            "loss_peak_rise": None if loss is None else loss.peak,
            "mean_entropy": health.mean_entropy, "entropy_ratio": health.entropy_ratio,
            "fired": list(health.fired), "settings": dataclasses.asdict(health.settings), "warning": warning}


def stop_message(stage_key: str, previous_key: str, fired: Sequence[str], report: str) -> str:
    """The one line a run stopped by the guard ends with: the stage, the checks, how to go on."""
    return (f"collapse guard: stage {stage_key} fired {', '.join(fired)} and self_training.on_collapse=stop: "
            f"stopped with the stage recorded (health table: {report}); to redo it with other settings rerun the "
            f"same command with --config.resume_from_stage={previous_key} and the changed keys (e.g. "
            f"--config.self_training.lr=...), or to keep it and go on add --config.resume_from_stage={stage_key} "
            f"--config.self_training.on_collapse=warn")
