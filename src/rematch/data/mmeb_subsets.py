"""The 36 MMEB-V1 evaluation subsets: meta-task and in-/out-of-distribution split.

IND = the 20 subsets that are also in MMEB-train; OOD = the 16 held out. Overall MMEB
scores are unweighted means over subsets (over all 36, per meta-task, IND, OOD).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def subset_info(name: str) -> SubsetInfo:
    """Known MMEB subsets get their meta-task and split; unknown ones are "other"/"other"
    unless registered (the built-in shapes tasks register themselves)."""
    return MMEB_SUBSETS.get(name) or EXTRA_SUBSETS.get(name) or SubsetInfo(name, OTHER, OTHER)


#: Subsets outside MMEB that know their meta-task (e.g. the built-in shapes world).
EXTRA_SUBSETS: dict[str, SubsetInfo] = {}


def register_subset(name: str, meta_task: str, split: str = "other") -> None:
    EXTRA_SUBSETS[name] = SubsetInfo(name, meta_task, split)
