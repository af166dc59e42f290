"""What an online round's pseudo-labels were: the per-step counts of the jitted step
(``online_step.label_counts``) summed over the round, and the round's pseudo-label row, in the
same fields as an offline round's (``run_report.pseudo_label_row``), so the pseudo-label table,
the figures and the collapse guard read both alike.

An offline round labels the whole target split once; an online round labels every target batch
it trains on, so its row sums over the round's steps: per class the pixels predicted (the argmax
the thresholds rank), selected (pixel weight > 0) and, where the target train records keep
ground truth (the embedded pair), selected correctly; the teacher's mean per-pixel entropy; the
mean pixel weight; and, for the class-balanced policy, the last step's thresholds λ_c. Ground
truth is only counted here, after the step: it never reaches the loss.

The tally is part of a round's training progress: its state (integers and one float64 sum) goes
into every training checkpoint's JSON, so a resumed round reports exactly what an uninterrupted
one does.
"""
from __future__ import annotations

import numpy as np


class Tally:
    """The running sums of one online round (``add`` each step's metrics, in order)."""

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)
        self.predicted = np.zeros(num_classes, np.int64)
        self.selected = np.zeros(num_classes, np.int64)
        self.correct: np.ndarray | None = None
        self.entropy_sum = 0.0
        self.weight_sum = 0.0
        self.pixels = 0
        self.steps = 0
        self.thresholds: list | None = None

    def add(self, metrics: dict) -> None:
        """One step's metrics (host values of ``online_step``'s)."""
        self.predicted += np.asarray(metrics["predicted"], np.int64)
        self.selected += np.asarray(metrics["selected"], np.int64)
        if "correct" in metrics:
            if self.correct is None:
                self.correct = np.zeros(self.num_classes, np.int64)
            self.correct += np.asarray(metrics["correct"], np.int64)
        pixels = int(metrics["pixels"])
        self.entropy_sum += float(metrics["entropy_sum"])
        self.weight_sum += float(metrics["pseudo_weight"]) * pixels
        self.pixels += pixels
        self.steps += 1
        if "thresholds" in metrics:
            self.thresholds = [float(t) for t in np.asarray(metrics["thresholds"])]

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        """JSON-able; :meth:`restore` of it gives the same tally (floats round-trip exactly)."""
        return {"predicted": self.predicted.tolist(), "selected": self.selected.tolist(),
                "correct": None if self.correct is None else self.correct.tolist(),
                "entropy_sum": self.entropy_sum, "weight_sum": self.weight_sum, "pixels": self.pixels,
                "steps": self.steps, "thresholds": self.thresholds}

    @classmethod
    def restore(cls, num_classes: int, state: dict) -> "Tally":
        t = cls(num_classes)
        t.predicted = np.asarray(state["predicted"], np.int64)
        t.selected = np.asarray(state["selected"], np.int64)
        t.correct = None if state["correct"] is None else np.asarray(state["correct"], np.int64)
        t.entropy_sum, t.weight_sum = float(state["entropy_sum"]), float(state["weight_sum"])
        t.pixels, t.steps = int(state["pixels"]), int(state["steps"])
        t.thresholds = state["thresholds"]
        return t

    # ------------------------------------------------------------------ the row
    def row(self, seed: int, method: str, round_idx: int, portion: float | None) -> dict:
        """The round's pseudo-label row (``kind`` "pseudo_labels", ``online`` True)."""
        sel = self.selected.astype(np.float64)
        pixels = max(self.pixels, 1)
        row = {"kind": "pseudo_labels", "seed": seed, "method": method, "round": round_idx, "online": True,
               "portion": portion, "thresholds": self.thresholds, "share": (sel / max(sel.sum(), 1)).tolist(),
               "selected_fraction": float(sel.sum() / pixels), "predicted": self.predicted.tolist(),
               "mean_entropy": self.entropy_sum / pixels if self.pixels else None,
               "mean_weight": self.weight_sum / pixels if self.pixels else None, "steps": self.steps}
        if self.correct is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                row["precision"] = np.where(sel > 0, self.correct / np.maximum(sel, 1), np.nan).tolist()
        return row
