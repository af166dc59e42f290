"""The self-training methods, as one table: the only place where ST, CBST, their spatial-prior
variants and the CRST regularisers differ.

Every method starts from the same source model (round 0) and runs the same rounds
(label the target at the round's portion p_r, retrain, evaluate). What a method changes:

* ``policy``: how the thresholds λ are set from the round's portion (``cbst_jax.selection``):
  ``"st"`` one λ over all pixels pooled, ``"cbst"`` one λ_c per class;
* ``spatial_prior``: the scores are q·p (the spatial prior q of ``cbst_jax.priors``) instead of
  p, both for the thresholds and for the labels (CBST-SP, ST-SP);
* ``label_regularizer``: CRST LR*: soft pseudo-labels, the closed-form minimisers of the
  label-regularised objective at CBST's λ (``cbst_jax.crst``, stored by ``cbst_jax.soft_labels``);
* ``model_regularizer``: CRST MR*: a regulariser of the model's target predictions added to the
  retraining loss (``cbst_jax.losses``);
* ``online``: the online teacher-student recipe (DACS / DAFormer, ``docs/online.md``) instead of
  offline rounds: an EMA teacher labels every target batch inside the jitted step
  (``cbst_jax.online_step``), with DAFormer's one confidence threshold (``"fixed"``) or the seed's
  class-balanced λ_c over a window of recent batches (``"class_balanced"``); a round is then a
  stretch of ``steps_per_round`` online steps at the round's portion p_r, and the whole online
  state (student, teacher, optimiser, window, RNG) carries from one round to the next. No
  offline labelling pass.

Stages: a run is the source stage, then ``(method, round)`` for every self-training method and
round. :class:`Stage` names them, with one spelling for people and one for files: its ``key``
("source", "cbst/r2") on the command line, in the run ledger and in messages, its ``slug``
("source", "cbst_r2") in every file and folder name of a workdir (``cbst_jax.workdir``).
"""
from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    policy: str | None                   # "st" | "cbst"; None: no self-training (source-only)
    spatial_prior: bool = False
    label_regularizer: str | None = None  # "lrent" | "lrl2" | "lrkld"
    model_regularizer: str | None = None  # "mrent" | "mrkld" | "mrl2"
    online: str | None = None            # "fixed" | "class_balanced": online teacher-student; None: offline

    @property
    def self_trains(self) -> bool:
        return self.policy is not None or self.online is not None

    @property
    def soft_labels(self) -> bool:
        return self.label_regularizer is not None


TABLE = (
    Method("source_only", None),
    Method("st", "st"),
    Method("st_sp", "st", spatial_prior=True),
    Method("cbst", "cbst"),
    Method("cbst_sp", "cbst", spatial_prior=True),
    Method("mrent", "cbst", model_regularizer="mrent"),
    Method("mrkld", "cbst", model_regularizer="mrkld"),
    Method("mrl2", "cbst", model_regularizer="mrl2"),
    Method("lrent", "cbst", label_regularizer="lrent"),
    Method("lrl2", "cbst", label_regularizer="lrl2"),
    Method("lrkld", "cbst", label_regularizer="lrkld"),
    Method("online_fixed", None, online="fixed"),
    Method("online_cbst", None, online="class_balanced"),
    Method("online_cbst_sp", None, spatial_prior=True, online="class_balanced"),
)
BY_NAME = {m.name: m for m in TABLE}
NAMES = tuple(BY_NAME)


def parse(text: str) -> list[Method]:
    """``"source_only,st,cbst"`` -> the methods, in order; ValueError whose argument is the first
    unknown name."""
    names = [m.strip() for m in str(text).split(",") if m.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(unknown[0])
    return [BY_NAME[n] for n in names]


def portion_at(schedule, round_idx: int) -> float:
    """The self-paced schedule ``min(first + r·step, max)``, shared by the target portion p_r
    (``self_training.portion``) and the source subset (``input.source_portion``)."""
    first, step, last = schedule
    return float(min(first + round_idx * step, last))


@dataclasses.dataclass(frozen=True)
class Stage:
    """One unit of a run: the source model (``round is None``) or a method's round."""
    method: str
    round: int | None = None

    @property
    def online(self) -> bool:
        """A round of an online method (its training carries an online state; no labelling pass)."""
        method = BY_NAME.get(self.method)
        return self.round is not None and method is not None and method.online is not None

    @property
    def key(self) -> str:
        """The stage on the command line, in the run ledger and in messages: "source", "cbst/r2"
        (also what a round's random stream is derived from)."""
        return "source" if self.round is None else f"{self.method}/r{self.round}"

    @property
    def slug(self) -> str:
        """The stage in file and folder names: "source", "cbst_r2"."""
        return "source" if self.round is None else f"{self.method}_r{self.round}"

    @property
    def label(self) -> str:
        """How tables and figures name the stage's row: "source_only", "cbst r2"."""
        return self.method if self.round is None else f"{self.method} r{self.round}"

    @classmethod
    def parse(cls, text: str) -> "Stage":
        """The stage a user names: its key ("source", "cbst/r2"), or as a file or a table names it
        ("cbst_r2", "cbst r2", "source_only"); ValueError (one line) for anything else, e.g. a
        method that does not self-train."""
        text = str(text).strip()
        if text in (SOURCE.key, SOURCE.slug, SOURCE.label):
            return SOURCE
        m = re.fullmatch(r"(\w+?)(?:/r|_r| r)(\d+)", text)
        method = BY_NAME.get(m[1]) if m else None
        if method is None or not method.self_trains:
            trainers = ", ".join(n for n, x in BY_NAME.items() if x.self_trains)
            raise ValueError(f"{text!r}: expected 'source' or '<method>/r<round>' with a self-training method "
                             f"({trainers}), e.g. cbst/r2")
        return cls(method.name, int(m[2]))


SOURCE = Stage("source_only", None)


def stages(methods, rounds: int) -> list[Stage]:
    """The run's stages in order: the source model, then each self-training method's rounds."""
    return [SOURCE] + [Stage(m.name, r) for m in methods if m.self_trains for r in range(rounds)]
