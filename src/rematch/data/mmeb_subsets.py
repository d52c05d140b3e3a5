"""The 36 MMEB-V1 evaluation subsets: meta-task and in-/out-of-distribution split.

IND = the 20 subsets that are also in MMEB-train; OOD = the 16 held out. Overall MMEB
scores are unweighted means over subsets (over all 36, per meta-task, IND, OOD).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

CLASSIFICATION, VQA, RETRIEVAL, GROUNDING, OTHER = "classification", "vqa", "retrieval", "grounding", "other"
META_TASKS = (CLASSIFICATION, VQA, RETRIEVAL, GROUNDING)


@dataclass(frozen=True)
class SubsetInfo:
    name: str
    meta_task: str
    split: str  # "IND", "OOD" or "other"


def _table() -> dict[str, SubsetInfo]:
    groups = {
        (CLASSIFICATION, "IND"): ["ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397"],
        (CLASSIFICATION, "OOD"): ["Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211"],
        (VQA, "IND"): ["OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W"],
        (VQA, "OOD"): ["ScienceQA", "VizWiz", "GQA", "TextVQA"],
        (RETRIEVAL, "IND"): ["VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t",
                             "NIGHTS", "WebQA"],
        (RETRIEVAL, "OOD"): ["OVEN", "FashionIQ", "EDIS", "Wiki-SS-NQ"],
        (GROUNDING, "IND"): ["MSCOCO"],
        (GROUNDING, "OOD"): ["RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"],
    }
    return {name: SubsetInfo(name, meta, split) for (meta, split), names in groups.items() for name in names}


MMEB_SUBSETS: dict[str, SubsetInfo] = _table()
MMEB_TRAIN_SUBSETS: tuple[str, ...] = tuple(name for name, info in MMEB_SUBSETS.items() if info.split == "IND")


#: Spellings of a subset in other MMEB files: MMEB-train writes ImageNet-1K's config as ImageNet_1K.
ALIASES = {"ImageNet_1K": "ImageNet-1K"}

#: Where a data root describes its own subsets (the built-in world writes it; see read_manifest_subsets).
MANIFEST_FILE = "manifest.json"


def subset_info(name: str, known: Mapping[str, SubsetInfo] | None = None) -> SubsetInfo:
    """A subset's meta-task and split: MMEB's own table, then ``known`` (what a data root's
    manifest declares, :func:`read_manifest_subsets`), else "other"/"other"."""
    info = MMEB_SUBSETS.get(ALIASES.get(name, name))
    if info is not None:
        return SubsetInfo(name, info.meta_task, info.split)
    return (known or {}).get(name) or SubsetInfo(name, OTHER, OTHER)


def read_manifest_subsets(root: str | os.PathLike) -> dict[str, SubsetInfo]:
    """The subsets a data root declares in its ``manifest.json``, as ``{name: SubsetInfo}``.

    Why a file and not code: a data folder (the built-in world, or a user's own set laid out
    like MMEB) says what its subsets are, so the readers need not import whoever wrote it.
    The manifest's ``subsets`` maps a name to ``{"meta_task": ..., "split": ...}``; a
    missing split is "IND" (the world's subsets are trained on, as MMEB's IND ones), an
    unknown meta-task "other". No manifest (or no ``subsets`` in it) declares nothing; an
    unreadable one is an error naming the file.
    """
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable JSON manifest ({error})") from None
    declared = manifest.get("subsets") if isinstance(manifest, dict) else None
    if not isinstance(declared, dict):
        return {}
    found = {}
    for name, entry in declared.items():
        entry = entry if isinstance(entry, dict) else {}
        meta_task = entry.get("meta_task") if entry.get("meta_task") in META_TASKS else OTHER
        split = entry.get("split", "IND") if entry.get("split", "IND") in ("IND", "OOD") else OTHER
        found[str(name)] = SubsetInfo(str(name), meta_task, split)
    return found
