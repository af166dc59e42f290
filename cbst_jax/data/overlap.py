"""Which adaptation (target train) images are also evaluation images, by content, and a view of
the adaptation split without them.

File names cannot decide this: the official NTHU lists reuse names between a city's Train and
Test folders (17 of Rome's 100 test names are also train names, 24 of Rio's, 34 of Tokyo's, 89
of Taipei's), while a renamed copy of an evaluation image would carry a new name. So every
record's decoded image is hashed (sha1 of its shape, dtype and uint8 pixels) and the hashes
are compared. Hashing decodes each image once per process (the hashes are kept on the source
object); a tqdm bar shows the progress.

    pairs = split_overlap(target_train, target_eval)            # [(train_index, eval_index)]
    adapt, report = without_eval_overlap(target_train, target_eval)   # the default protocol
    adapt, report = without_eval_overlap(target_train, target_eval, allow_overlap=True)  # published
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from cbst_jax.data.io import DatasetError

_CACHE_ATTR = "_content_hashes"


def image_hash(image: np.ndarray) -> str:
    """sha1 hex digest of an image's shape, dtype and pixels (equal iff the decoded images are equal)."""
    image = np.ascontiguousarray(image)
    digest = hashlib.sha1(f"{image.shape}|{image.dtype.str}|".encode())
    digest.update(image.data)
    return digest.hexdigest()


class SubsetSource:
    """A view of ``source`` holding only the records at ``indices`` (in that order).

    Records, ``names`` and ``len`` follow the view; every other attribute (``dataset``,
    ``split``, ``num_classes``, ``has_labels``, ``stats``, ``city``, ...) is the source's.
    Picklable when the source is (grain worker processes receive pickled sources).
    """

    def __init__(self, source, indices: Sequence[int]):
        n = len(source)
        self.source = source
        self.indices = [int(i) for i in indices]
        bad = [i for i in self.indices if not 0 <= i < n]
        if bad:
            raise IndexError(f"indices {bad[:3]} out of range for a source of {n} records")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        n = len(self.indices)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} records")
        return self.source[self.indices[index]]

    @property
    def names(self) -> list[str]:
        names = self.source.names
        return [names[i] for i in self.indices]

    def __getattr__(self, name):
        if name.startswith("__") or name in ("source", "indices"):
            raise AttributeError(name)
        return getattr(self.source, name)

    def __repr__(self) -> str:
        return f"SubsetSource({self.source!r}, {len(self)} of {len(self.source)} records)"


def exclude(source, indices) -> SubsetSource:
    """A view of ``source`` without the records at ``indices`` (order of the rest kept)."""
    drop = {int(i) for i in indices}
    return SubsetSource(source, [i for i in range(len(source)) if i not in drop])


def content_hashes(source, *, desc: str | None = None, workers: int | None = None,
                   progress: bool = True) -> list[str]:
    """:func:`image_hash` of every record's image, in record order; computed once per source
    object (kept on it) with ``workers`` threads (default: the CPU count, at most 8)."""
    if isinstance(source, SubsetSource):
        parent = content_hashes(source.source, desc=desc, workers=workers, progress=progress)
        return [parent[i] for i in source.indices]
    cached = getattr(source, _CACHE_ATTR, None)
    if cached is not None and len(cached) == len(source):
        return list(cached)
    from tqdm import tqdm

    def one(i):
        return image_hash(source[i]["image"])

    workers = workers or min(8, os.cpu_count() or 1)
    label = desc or f"hashing {getattr(source, 'dataset', 'dataset')} {getattr(source, 'split', '')}".rstrip()
    with ThreadPoolExecutor(workers) as pool:
        hashes = list(tqdm(pool.map(one, range(len(source))), total=len(source), desc=label, leave=False,
                           disable=not progress))
    try:
        setattr(source, _CACHE_ATTR, hashes)
    except AttributeError:  # a source that takes no attributes is simply hashed again next time
        pass
    return list(hashes)


def split_overlap(train_source, eval_source, **hash_options) -> list[tuple[int, int]]:
    """Every (train_index, eval_index) whose decoded images are identical, sorted."""
    train = content_hashes(train_source, **hash_options)
    by_hash: dict[str, list[int]] = {}
    for j, h in enumerate(content_hashes(eval_source, **hash_options)):
        by_hash.setdefault(h, []).append(j)
    return [(i, j) for i, h in enumerate(train) for j in by_hash.get(h, ())]


def overlap_report(train_source, eval_source, pairs, *, allow_overlap: bool, kept: int) -> dict:
    """Counts for the run's report: sizes, shared file names, content overlap, what was left out."""
    train_names, eval_names = train_source.names, eval_source.names
    report = {
        "train_images": len(train_source),
        "eval_images": len(eval_source),
        "shared_names": len(set(train_names) & set(eval_names)),
        "overlap_pairs": len(pairs),
        "train_images_in_eval": len({i for i, _ in pairs}),
        "eval_images_in_train": len({j for _, j in pairs}),
        "allow_eval_overlap": bool(allow_overlap),
        "excluded_train_images": len(train_source) - kept,
        "adaptation_images": kept,
        "overlapping": [[train_names[i], eval_names[j]] for i, j in pairs],
    }
    if getattr(train_source, "city", None):
        report["city"] = train_source.city
    return report


def without_eval_overlap(train_source, eval_source, *, allow_overlap: bool = False, **hash_options):
    """(adaptation source, report dict). By default the train records whose image is also an
    evaluation image are left out (a view, :class:`SubsetSource`), so no evaluation image is
    pseudo-labelled (DatasetError when that leaves none); ``allow_overlap=True`` keeps them (the
    published protocol) and the report says how many evaluation images are also adapted on."""
    pairs = split_overlap(train_source, eval_source, **hash_options)
    adapt = train_source if allow_overlap or not pairs else exclude(train_source, [i for i, _ in pairs])
    if len(adapt) == 0:
        raise DatasetError(f"every one of the {len(train_source)} target train images is also an evaluation image "
                           f"(by content), so none is left to adapt on; expected a target train split apart from "
                           f"the evaluation split, or target.allow_eval_overlap=True (the published protocol)")
    return adapt, overlap_report(train_source, eval_source, pairs, allow_overlap=allow_overlap, kept=len(adapt))


def check_disjoint(train_source, eval_source, **hash_options) -> None:
    """Refuse a training source that holds any evaluation image (compared by content, not name);
    DatasetError naming up to three of the overlapping pairs."""
    pairs = split_overlap(train_source, eval_source, **hash_options)
    if pairs:
        train_names, eval_names = train_source.names, eval_source.names
        shown = ", ".join(f"{train_names[i]} = {eval_names[j]}" for i, j in pairs[:3])
        raise DatasetError(f"{len({i for i, _ in pairs})} training images are evaluation images ({shown}"
                           f"{', ...' if len(pairs) > 3 else ''}); a target split must not overlap the "
                           f"evaluation split")
