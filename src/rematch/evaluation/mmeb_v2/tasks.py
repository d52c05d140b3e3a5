"""The 78 MMEB-V2 tasks: modality, report category, reader family and where their data lives.

MMEB-V2 (VLM2Vec-V2, arXiv 2507.04590) = the 36 image tasks of MMEB-V1 + 18 video tasks
+ 24 visual-document tasks. The official report scores image and video tasks by hit@1 and
visual documents by NDCG@5 (linear gains), and shows, per modality, the mean of each
category and of all its tasks, plus one overall mean over all tasks ("All"). Every mean is
unweighted over tasks.

Where the data lives (relative to ``--data ROOT``) follows the directory the VLM2Vec
harness is pointed at with ``--data_basedir`` (its ``experiments/public/eval/*.yaml``
configs) with the test rows stored locally the way its ``dataset_hflocal_path`` expects:

* image: ``image-tasks/<Subset>/test.*`` -- the MMEB-eval rows ``rematch eval mmeb`` reads;
* video: rows in ``video-tasks/<dataset>/[<config>/]<split>.*`` (a Hugging Face snapshot of
  ``VLM2Vec/<dataset>``), frames in ``video-tasks/frames/<family>/<dir>/<video id>/`` (the
  frames of ``TIGER-Lab/MMEB-V2``), raw videos optionally in ``video-tasks/videos/...``;
* visual documents: BEIR tables (``queries``, ``corpus``, ``qrels``) and page images in
  ``visdoc-tasks/<dir>/``.

The protocol constants below (task instructions, directory names, splits) are the
published ones, because scores are only comparable when they are the same; the code that
reads them is this project's own.

Tasks outside the benchmark (the built-in world, a user's own) are added with
:func:`register_task` or by a ``task.json`` descriptor in their task directory
(:func:`task_from_descriptor`); they are reported per task but never enter the official
means while an official task is present.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Iterable, Mapping

from rematch.data.mmeb_subsets import CLASSIFICATION, GROUNDING, MMEB_SUBSETS, RETRIEVAL, VQA

IMAGE, VIDEO, VISDOC = "image", "video", "visdoc"
MODALITIES = (IMAGE, VIDEO, VISDOC)

#: The report's categories per modality, in the official column order.
CATEGORIES: dict[str, tuple[str, ...]] = {
    IMAGE: ("CLS", "QA", "RET", "GD"),
    VIDEO: ("CLS", "QA", "RET", "MRET"),
    VISDOC: ("VDRv1", "VDRv2", "VR", "OOD"),
}

#: The score each modality is reported by (keys of the per-task result).
PRIMARY_METRIC: dict[str, str] = {IMAGE: "hit@1", VIDEO: "hit@1", VISDOC: "ndcg@5"}

#: Reader families (see video.py and visdoc.py); "mmeb" is the MMEB-V1 row reader.
VIDEO_FAMILIES = ("video_cls", "ssv2", "msrvtt", "msvd", "didemo", "youcook2", "vatex", "moment", "momentseeker",
                  "videomme", "nextqa", "egoschema", "mvbench", "activitynetqa")
VISDOC_FAMILIES = ("vidore", "visrag")

_IMAGE_CATEGORY = {CLASSIFICATION: "CLS", VQA: "QA", RETRIEVAL: "RET", GROUNDING: "GD"}

#: The multiple-choice prompt of the video QA tasks (published protocol text).
QA_PROMPT = ("Given a video and a question, select the most accurate answer from the provided candidates. "
             "Return only the exact text of your chosen answer. Question: ")
DOCUMENT_QUERY = "Find a document image that matches the given query:"

#: The harness's candidate texts (its ``TASK_INST_TGT``): what a video or a page candidate says
#: next to its frames or its image. Class labels and QA options get none: they are the bare text.
VIDEO_CANDIDATE = "Understand the content of the provided video."
VIDEO_CLIP_CANDIDATE = "Understand the content of the provided video clip."  # MomentSeeker's wording
DOCUMENT_CANDIDATE = "Understand the content of the provided document image."
#: The candidate text of each reader family (what a task of one's own of that family gets too).
CANDIDATE_INSTRUCTIONS: dict[str, str] = {
    **dict.fromkeys(("video_cls", "ssv2", "videomme", "nextqa", "egoschema", "mvbench", "activitynetqa"), ""),
    **dict.fromkeys(("msrvtt", "msvd", "didemo", "youcook2", "vatex", "moment"), VIDEO_CANDIDATE),
    "momentseeker": VIDEO_CLIP_CANDIDATE,
    **dict.fromkeys(VISDOC_FAMILIES, DOCUMENT_CANDIDATE),
}


@dataclass(frozen=True)
class TaskSpec:
    """One task: how to report it, which reader reads it, and where its files are.

    Paths are relative to the data root. ``rows`` is the directory of the row table
    (video tasks; the table is ``[<config>/]<split>.*`` inside it); ``frames`` and
    ``videos`` the frame and raw-video roots (video tasks); ``tables`` the directories
    searched for the BEIR tables and ``pages`` the page-image directory (document tasks).
    """

    name: str
    modality: str
    category: str
    family: str
    official: bool = True
    split: str = "test"
    config: str | None = None
    rows: str | None = None
    frames: str | None = None
    videos: str | None = None
    tables: tuple[str, ...] = ()
    pages: str | None = None
    instruction: str = ""
    language: str | None = None
    candidate_instruction: str | None = None
    """The text every candidate video or page carries (the harness's ``TASK_INST_TGT``); None:
    the family's (:data:`CANDIDATE_INSTRUCTIONS`)."""
    labels: str | None = None
    """A class-label list shipped with rematch (``labels/<name>.txt``): the full candidate pool of
    a global classification task, used unless the rows directory has ``labels.txt``/``labels.json``."""
    fixed: str | None = None
    """The directory (under ``visdoc-tasks/``) of a corrected copy of the dataset that the harness
    reads instead since it was published (``ViDoSeek-page-fixed``); read when present, else the
    original layout (``tables``, ``pages``)."""

    @property
    def primary_metric(self) -> str:
        return PRIMARY_METRIC[self.modality]

    @property
    def candidate_text(self) -> str:
        """The text of this task's video or page candidates ("" for labels and QA options)."""
        if self.candidate_instruction is not None:
            return self.candidate_instruction
        return CANDIDATE_INSTRUCTIONS.get(self.family, "")

    def validate(self) -> "TaskSpec":
        if self.modality not in MODALITIES:
            raise ValueError(f"task {self.name}: modality {self.modality!r} is not one of {MODALITIES}")
        if self.official and self.category not in CATEGORIES[self.modality]:
            raise ValueError(f"task {self.name}: category {self.category!r} is not one of "
                             f"{CATEGORIES[self.modality]} ({self.modality})")
        families = {IMAGE: ("mmeb",), VIDEO: VIDEO_FAMILIES, VISDOC: VISDOC_FAMILIES}[self.modality]
        if self.modality == VIDEO and not self.frames:
            raise ValueError(f"task {self.name}: a video task needs a frame root")
        if self.family not in families:
            raise ValueError(f"task {self.name}: reader family {self.family!r} is not one of {families}")
        return self


def _video(name: str, category: str, family: str, kind: str, *, dataset: str | None = None,
           frame_dir: str | None = None, instruction: str = "", split: str = "test",
           config: str | None = None, labels: str | None = None) -> TaskSpec:
    folder = frame_dir or name
    return TaskSpec(name, VIDEO, category, family, split=split, config=config, rows=f"video-tasks/{dataset or name}",
                    frames=f"video-tasks/frames/{kind}/{folder}", videos=f"video-tasks/videos/{kind}/{folder}",
                    instruction=instruction, labels=labels)


def _visdoc(name: str, category: str, table_dir: str, page_dir: str | None = None, family: str = "vidore",
            split: str = "test", fixed: str | None = None) -> TaskSpec:
    pages = f"visdoc-tasks/{page_dir or name}"
    tables = tuple(dict.fromkeys((pages, f"visdoc-tasks/{table_dir}")))
    return TaskSpec(name, VISDOC, category, family, split=split, tables=tables, pages=pages,
                    instruction=DOCUMENT_QUERY, fixed=fixed)


def with_fixed_layout(spec: TaskSpec) -> TaskSpec:
    """``spec`` reading its corrected dataset (``spec.fixed``): tables and pages in that directory.

    Pages get a directory of their own, not the original one: the corrected dataset numbers
    pages with the same ids, and a page saved from the old copy must never stand in for it.
    """
    if spec.fixed is None:
        return spec
    place = f"visdoc-tasks/{spec.fixed}"
    return replace(spec, tables=(place,), pages=place)


def _official_tasks() -> dict[str, TaskSpec]:
    tasks = [TaskSpec(name, IMAGE, _IMAGE_CATEGORY[info.meta_task], "mmeb", rows=f"image-tasks/{name}")
             for name, info in MMEB_SUBSETS.items()]
    cls, ret, qa = "video_cls", "video_ret", "video_qa"
    tasks += [
        _video("K700", "CLS", "video_cls", cls, dataset="Kinetics-700", labels="K700",
               instruction="Recognize the category of the video content."),
        _video("SmthSmthV2", "CLS", "ssv2", cls, frame_dir="SSv2",
               instruction="What actions or object interactions are being performed by the person in the video?"),
        _video("HMDB51", "CLS", "video_cls", cls, labels="HMDB51",
               instruction="What actions or objects interactions are the person in the video doing?"),
        _video("UCF101", "CLS", "video_cls", cls, labels="UCF101",
               instruction="What activities or sports are being performed by the person in the video?"),
        _video("Breakfast", "CLS", "video_cls", cls, labels="Breakfast",
               instruction="Recognize the breakfast type that the person is cooking in the video."),
        _video("MVBench", "QA", "mvbench", qa, split="train", instruction=QA_PROMPT),
        _video("Video-MME", "QA", "videomme", qa, instruction=QA_PROMPT),
        _video("NExTQA", "QA", "nextqa", qa, config="MC", instruction=QA_PROMPT),
        _video("EgoSchema", "QA", "egoschema", qa, config="Subset", instruction=QA_PROMPT),
        _video("ActivityNetQA", "QA", "activitynetqa", qa, instruction=QA_PROMPT),
        _video("DiDeMo", "RET", "didemo", ret,
               instruction="Find a video that includes the following described scenes:"),
        _video("MSR-VTT", "RET", "msrvtt", ret, config="test_1k",
               instruction="Find a video that contains the following visual content:"),
        _video("MSVD", "RET", "msvd", ret, instruction="Find the video snippet that corresponds to the given summary:"),
        _video("VATEX", "RET", "vatex", ret, instruction="Select a video that fits the description provided:"),
        _video("YouCook2", "RET", "youcook2", ret, split="val",
               instruction="Find a video that demonstrates the following action while making a recipe:"),
        _video("QVHighlight", "MRET", "moment", "video_mret",
               instruction="Find the clip that corresponds to the described scene in the given video:"),
        _video("Charades-STA", "MRET", "moment", "video_mret", frame_dir="Charades_STA",
               instruction="Find the clip that corresponds to the described scene in the given video:"),
        _video("MomentSeeker", "MRET", "momentseeker", "video_mret"),
    ]
    v1 = ["arxivqa_test_subsampled", "docvqa_test_subsampled", "infovqa_test_subsampled", "tabfquad_test_subsampled",
          "tatdqa_test", "shiftproject_test", "syntheticDocQA_artificial_intelligence_test",
          "syntheticDocQA_energy_test", "syntheticDocQA_government_reports_test",
          "syntheticDocQA_healthcare_industry_test"]
    for hf_name in v1:
        short = hf_name.replace("_test_subsampled", "").replace("_test", "")
        tasks.append(_visdoc(f"ViDoRe_{short}", "VDRv1", f"{hf_name}_beir"))
    tasks.append(_visdoc("ViDoRe_esg_reports_human_labeled_v2", "VDRv2", "esg_reports_human_labeled_v2",
                         "esg_reports_human_labeled_v2"))
    for base in ("biomedical_lectures_v2", "economics_reports_v2", "esg_reports_v2"):
        tasks.append(_visdoc(f"ViDoRe_{base}_multilingual", "VDRv2", base, f"{base}_multilingual"))
    for name in ("ArxivQA", "ChartQA", "MP-DocVQA", "SlideVQA", "InfoVQA", "PlotQA"):
        tasks.append(_visdoc(f"VisRAG_{name}", "VR", f"VisRAG-Ret-Test-{name}", family="visrag", split="train"))
    # the page tasks: since 2025-11 the harness reads the corrected VLM2Vec/*-page-fixed datasets
    tasks += [_visdoc("ViDoSeek-page", "OOD", "ViDoSeek-page", fixed="ViDoSeek-page-fixed"),
              _visdoc("ViDoSeek-doc", "OOD", "ViDoSeek"),
              _visdoc("MMLongBench-page", "OOD", "MMLongBench", fixed="MMLongBench-page-fixed"),
              _visdoc("MMLongBench-doc", "OOD", "MMLongBench-doc")]
    return {task.name: task.validate() for task in tasks}


#: The benchmark's 78 tasks by name.
OFFICIAL_TASKS: dict[str, TaskSpec] = _official_tasks()
#: Tasks added by :func:`register_task` (never part of the official means).
EXTRA_TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Make a non-benchmark task known by name (reported per task, outside the official means)."""
    if spec.name in OFFICIAL_TASKS:
        raise ValueError(f"{spec.name} is an MMEB-V2 task; a registered task needs another name")
    spec = replace(spec, official=False).validate()
    EXTRA_TASKS[spec.name] = spec
    return spec


def task_spec(name: str) -> TaskSpec | None:
    return OFFICIAL_TASKS.get(name) or EXTRA_TASKS.get(name)


def official_task_names(modality: str | None = None) -> list[str]:
    return [name for name, spec in OFFICIAL_TASKS.items() if modality is None or spec.modality == modality]


#: The file in a task directory that describes a task of one's own (see :func:`task_from_descriptor`).
DESCRIPTOR = "task.json"
_DESCRIPTOR_FIELDS = {f.name for f in fields(TaskSpec)} - {"name", "official", "modality"}


def _default_instruction(family: str) -> str:
    """The instruction of the first benchmark task read by ``family`` (what a task of one's own gets)."""
    if family == "video_cls":
        return OFFICIAL_TASKS["K700"].instruction
    return next((spec.instruction for spec in OFFICIAL_TASKS.values() if spec.family == family), "")


def task_from_descriptor(task_dir: Path, modality: str, root: Path) -> TaskSpec:
    """A task of one's own described by ``<task dir>/task.json`` (the built-in world writes these).

    The directory is ``ROOT/video-tasks/<Name>`` or ``ROOT/visdoc-tasks/<Name>``; the JSON
    object holds ``family`` and ``category`` and may set any other :class:`TaskSpec` field
    (paths relative to ROOT). Defaults: video rows in the task directory and frames in
    ``video-tasks/frames/<Name>``; document tables and pages in the task directory; the
    instruction of the family's benchmark tasks.
    """
    path = task_dir / DESCRIPTOR
    try:
        described = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable JSON object ({error})") from error
    if not isinstance(described, dict):
        raise ValueError(f"{path}: expected a JSON object with 'family' and 'category'")
    unknown = sorted(set(described) - _DESCRIPTOR_FIELDS)
    missing = [key for key in ("family", "category") if key not in described]
    if unknown or missing:
        raise ValueError(f"{path}: " + (f"unknown field(s) {unknown} (known: {sorted(_DESCRIPTOR_FIELDS)})"
                                         if unknown else f"missing field(s) {missing}"))
    name = task_dir.name
    relative = task_dir.relative_to(root).as_posix()
    defaults: dict = ({"rows": relative, "frames": f"video-tasks/frames/{name}", "videos": f"video-tasks/videos/{name}"}
                      if modality == VIDEO else {"tables": (relative,), "pages": relative})
    values = {**defaults, "instruction": _default_instruction(str(described["family"])), **described}
    if isinstance(values.get("tables"), (list, tuple, str)):
        values["tables"] = (values["tables"],) if isinstance(values["tables"], str) else tuple(values["tables"])
    try:
        return replace(TaskSpec(name, modality, "", ""), official=False, **values).validate()
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from error


def categories_of(specs: Iterable[TaskSpec]) -> Mapping[str, list[str]]:
    """``{"<modality>/<category>": [task names]}`` in the official column order."""
    found: dict[str, list[str]] = {f"{m}/{c}": [] for m in MODALITIES for c in CATEGORIES[m]}
    for spec in specs:
        found[f"{spec.modality}/{spec.category}"].append(spec.name)
    return found


__all__ = ["CANDIDATE_INSTRUCTIONS", "CATEGORIES", "DESCRIPTOR", "DOCUMENT_CANDIDATE", "VIDEO_CANDIDATE",
           "VIDEO_CLIP_CANDIDATE", "with_fixed_layout", "EXTRA_TASKS", "IMAGE", "MODALITIES", "OFFICIAL_TASKS", "PRIMARY_METRIC",
           "TaskSpec", "VIDEO", "VISDOC", "official_task_names", "register_task", "task_from_descriptor",
           "task_spec"]
