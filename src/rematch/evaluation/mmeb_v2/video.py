"""Readers of the MMEB-V2 video tasks (classification, QA, retrieval, moment retrieval).

Each family reads the columns its published rows have (the ``VLM2Vec/<dataset>`` tables)
and finds each video as the harness does: a directory of extracted frames under the
task's frame root (``video-tasks/frames/<family>/<dir>/<video id>/``), or, where that is
missing, the raw video file under its video root. Items carry the directory or the file
as their ``video``; which frames are encoded is the adapter's sampling rule, which
``eval mmeb-v2`` sets to the harness's 8 frames (``rematch.evaluation.settings.video_sampling``).

Candidates are written as the harness writes them: a candidate video carries the task's
candidate text ("Understand the content of the provided video."; MomentSeeker's "... video
clip."), a class label or a QA option is the bare text (``TaskSpec.candidate_text``).

Global tasks (retrieval, classification except SmthSmthV2) rank every query against one
pool: all the task's videos, or all its class labels. A classification pool is the
dataset's full label list, as the harness's: ``labels.txt`` / ``labels.json`` beside the
rows when given, else the list rematch ships (``labels/<task>.txt``: Kinetics-700's 700
classes, UCF101's 101, HMDB51's 51, Breakfast's 10, spelt as the published rows spell
them), else, for a task of one's own, the labels of its rows. With a list, a row whose
label is not on it is a bad row, never a silently grown pool. Local tasks (QA, moment
retrieval, SmthSmthV2) rank each query against its own options or clips (SmthSmthV2's 174
templates ship too, ``labels/SmthSmthV2.txt``, but its pool is each row's options).

Every problem names the file, the row and the field; with ``skip_bad`` the row is skipped
and counted instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from rematch.data.items import Item
from rematch.data.mmeb import as_list
from rematch.data.records import RowRef
from rematch.data.validation import SCHEMA, BadRowReport, DataError, RowProblem
from rematch.evaluation.mmeb_v2.records import (
    MISSING_VIDEO, BadRow, RankingExample, RankingTask, media_item, with_instruction)
from rematch.evaluation.mmeb_v2.tables import IMAGE_SUFFIXES, frame_directory_has_frames, iter_rows
from rematch.evaluation.mmeb_v2.tasks import TaskSpec

#: MomentSeeker's three query kinds have their own instructions (published protocol text).
MOMENTSEEKER_TEXT = "Find the clip that corresponds to the given text:"
MOMENTSEEKER_IMAGE = "Select the video clip that aligns with the given text and image:"
MOMENTSEEKER_VIDEO = "Find the clip that corresponds to the given sentence and video segment:"
VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mkv", ".mov")
LABEL_FILES = ("labels.json", "labels.txt")
#: The label lists rematch ships (``<name>.txt``, one label per line, in the rows' spelling).
SHIPPED_LABELS = Path(__file__).with_name("labels")


def shipped_labels(name: str) -> list[str]:
    """A label list shipped with rematch (``labels/<name>.txt``); an error naming the file if absent."""
    path = SHIPPED_LABELS / f"{name}.txt"
    if not path.is_file():
        raise DataError(f"the label list {path} is missing from this rematch installation; put the task's full "
                        "label list in labels.txt beside its rows")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class VideoRowReader:
    """Reads one video task into a :class:`RankingTask` (see the module docstring)."""

    def __init__(self, spec: TaskSpec, root: str | os.PathLike, skip_bad: bool = False,
                 report: BadRowReport | None = None):
        self.spec = spec
        self.root = Path(root)
        self.skip_bad = skip_bad
        self.task = RankingTask(spec.name, report=report if report is not None else BadRowReport())
        self.frames = self.root / spec.frames if spec.frames else None
        self.videos = self.root / spec.videos if spec.videos else None
        self.rows_dir = self.root / spec.rows if spec.rows else None
        #: Where a classification task's fixed label pool came from (None: the rows' labels).
        self.label_source: str | None = None

    # ------------------------------------------------------------------ reading

    def read(self) -> RankingTask:
        family = FAMILIES.get(self.spec.family)
        if family is None:
            raise DataError(f"{self.spec.name}: unknown video reader family {self.spec.family!r}")
        if self.rows_dir is None:
            raise DataError(f"{self.spec.name}: the task names no row directory")
        if self.spec.family == "video_cls":
            self._add_label_file()
        for ref, row in iter_rows([self.rows_dir], self.spec.split, config=self.spec.config,
                                  report=self.task.report, skip_bad=self.skip_bad):
            try:
                example = family(self, row, ref)
            except BadRow as bad:
                self.task.report.handle(bad.problem, self.skip_bad)
                continue
            self.task.examples.append(example)
        if not self.task.examples:
            raise DataError(f"{self.spec.name}: no usable rows in {self.rows_dir}")
        return self.task

    def _add_label_file(self) -> None:
        """The full class-label pool: the task directory's label file, else the list rematch ships."""
        for name in LABEL_FILES:
            path = self.rows_dir / name
            if not path.is_file():
                continue
            text = path.read_text(encoding="utf-8")
            labels = json.loads(text) if name.endswith(".json") else [line.strip() for line in text.splitlines()]
            labels = [label for label in labels if isinstance(label, str) and label.strip()]
            if not labels:
                raise DataError(f"{path}: no labels (expected a JSON list of strings, or one label per line)")
            self._set_pool(labels, str(path))
            return
        if self.spec.labels:
            self._set_pool(shipped_labels(self.spec.labels), str(SHIPPED_LABELS / f"{self.spec.labels}.txt"))
        elif self.spec.official:  # a benchmark task's pool is its full label list, never the rows' labels
            raise DataError(f"{self.spec.name}: no full label list (a smaller pool would inflate hit@1); put the "
                            f"dataset's labels in {self.rows_dir / 'labels.txt'}, one per line")

    def _set_pool(self, labels: list[str], source: str) -> None:
        for number, label in enumerate(labels):
            self.task.add_candidate(label, Item(text=label), f"{source} line {number + 1}")
        self.label_source = source

    @property
    def candidate_text(self) -> str | None:
        """The text a candidate video carries (None: no text)."""
        return self.spec.candidate_text or None

    # ------------------------------------------------------------------ fields

    def text(self, row: Mapping[str, Any], name: str, ref: RowRef) -> str:
        value = self.value(row, name, ref)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise BadRow(RowProblem(SCHEMA, ref, name, f"must be a non-empty string, got {value!r}"[:200]))
        return value

    def texts(self, row: Mapping[str, Any], name: str, ref: RowRef, first_only: bool = False) -> list[str]:
        """A list of non-empty strings (``first_only``: a caption list of which the harness uses the first)."""
        values = as_list(self.value(row, name, ref))
        if not values or not all(isinstance(v, str) and v.strip() for v in values):
            raise BadRow(RowProblem(SCHEMA, ref, name, f"must be a non-empty list of non-empty strings, got "
                                    f"{row.get(name)!r}"[:200]))
        return values[:1] if first_only else values

    @staticmethod
    def value(row: Mapping[str, Any], name: str, ref: RowRef) -> Any:
        if name not in row:
            raise BadRow(RowProblem(SCHEMA, ref, name, f"missing column (row has: {', '.join(sorted(row)) or 'none'})"))
        return row[name]

    def video(self, frame_name: str, ref: RowRef, field: str, video_file: str | None = None,
              frames: Path | None = None) -> str:
        """The frame directory of a video if it holds frames, else its raw video file, else a bad row."""
        frames = frames if frames is not None else self.frames
        directory = frames / frame_name if frames is not None else None
        if directory is not None and frame_directory_has_frames(directory):
            return str(directory)
        candidates = []
        if self.videos is not None:
            names = [video_file] if video_file else [frame_name + suffix for suffix in VIDEO_SUFFIXES]
            candidates = [self.videos / name for name in names]
        for path in candidates:
            if path.is_file():
                return str(path)
        looked = [str(directory)] if directory is not None else []
        looked += [str(candidates[0])] if video_file and candidates else []
        raise BadRow(RowProblem(MISSING_VIDEO, ref, field, f"video not found: no frames in "
                                f"{' and no file '.join(looked) or frame_name}"))

    # ------------------------------------------------------------------ building examples

    def ranked_against_pool(self, query, answer_id: str, answer_item, ref: RowRef) -> RankingExample:
        """A global-task query whose single answer joins the shared pool."""
        index = self.task.add_candidate(answer_id, answer_item, str(ref))
        return RankingExample(query=query, relevant={index: 1.0}, candidates=None, ref=ref)

    def ranked_against_own(self, query, options: list[tuple[str, Any]], correct: list[str], ref: RowRef,
                           field: str) -> RankingExample:
        """A local-task query ranked against its own options ``(id, item)``; ``correct`` names the answers."""
        ids = [option_id for option_id, _ in options]
        missing = [answer for answer in correct if answer not in ids]
        if missing or not correct:
            raise BadRow(RowProblem(SCHEMA, ref, field, f"answer {missing[0] if missing else None!r} is not among "
                                    f"the candidates {ids}"[:300]))
        indices = tuple(self.task.add_candidate(option_id, item, str(ref)) for option_id, item in options)
        relevant = {indices[ids.index(answer)]: 1.0 for answer in correct}
        return RankingExample(query=query, relevant=relevant, candidates=indices, ref=ref)


# ====================================================================== families

def _classification(reader: VideoRowReader, row, ref) -> RankingExample:
    video_id, label = reader.text(row, "video_id", ref), reader.text(row, "pos_text", ref)
    if reader.label_source is not None and reader.task.index_of(label) is None:
        raise BadRow(RowProblem(SCHEMA, ref, "pos_text", f"label {label!r} is not in the task's label list "
                                f"({reader.label_source})"[:300]))
    query = media_item(text=reader.spec.instruction, video=reader.video(video_id, ref, "video_id"))
    return reader.ranked_against_pool(query, label, Item(text=label), ref)


def _ssv2(reader: VideoRowReader, row, ref) -> RankingExample:
    video_id, label = reader.text(row, "video_id", ref), reader.text(row, "pos_text", ref)
    options = reader.texts(row, "neg_text", ref)
    query = media_item(text=reader.spec.instruction, video=reader.video(video_id, ref, "video_id"))
    return reader.ranked_against_own(query, [(text, Item(text=text)) for text in options], [label], ref, "pos_text")


def _retrieval(id_field: str | None, file_field: str, caption_field: str, caption_list: bool = False,
               file_is_basename: bool = False) -> Callable:
    """Text-to-video retrieval: the caption finds its video among all the task's videos."""

    def read(reader: VideoRowReader, row, ref) -> RankingExample:
        caption = (reader.texts(row, caption_field, ref, first_only=True)[0] if caption_list
                   else reader.text(row, caption_field, ref))
        file_name = reader.text(row, file_field, ref) if file_field else None
        if id_field is None:  # the id is the file's stem (DiDeMo)
            video_id = Path(file_name).stem
        else:
            video_id = reader.text(row, id_field, ref)
        if file_name is not None and file_is_basename:
            file_name = os.path.basename(file_name)
        video = reader.video(video_id, ref, id_field or file_field, video_file=file_name)
        query = Item(text=with_instruction(reader.spec.instruction, caption))
        return reader.ranked_against_pool(query, video_id, media_item(text=reader.candidate_text, video=video), ref)

    return read


def _vatex(reader: VideoRowReader, row, ref) -> RankingExample:
    video_id = reader.text(row, "videoID", ref)
    caption = reader.texts(row, "enCap", ref, first_only=True)[0]
    video = reader.video(video_id, ref, "videoID", video_file=f"{video_id}.mp4")
    query = Item(text=with_instruction(reader.spec.instruction, caption))
    return reader.ranked_against_pool(query, video_id, media_item(text=reader.candidate_text, video=video), ref)


def _moment(reader: VideoRowReader, row, ref) -> RankingExample:
    """QVHighlight / Charades-STA: ``<frames>/<video>/query`` is the query video, every other
    sub-directory a candidate clip, the one named ``positive*`` the answer."""
    text = reader.text(row, "query", ref)
    name = Path(reader.text(row, "video_path", ref)).stem
    clips_dir = reader.frames / name
    query_video = reader.video("query", ref, "video_path", frames=clips_dir)
    clips = sorted(entry.name for entry in os.scandir(clips_dir) if entry.is_dir() and entry.name != "query")
    positives = [clip for clip in clips if clip.startswith("positive")]
    if not positives:
        raise BadRow(RowProblem(MISSING_VIDEO, ref, "video_path", f"{clips_dir} has no clip directory named "
                                "positive* (the correct moment)"))
    options = [(str(clips_dir / clip), media_item(text=reader.candidate_text,
                                                  video=reader.video(clip, ref, "video_path", frames=clips_dir)))
               for clip in clips]
    query = media_item(text=with_instruction(reader.spec.instruction, text), video=query_video)
    return reader.ranked_against_own(query, options, [str(clips_dir / p) for p in positives], ref, "video_path")


def _momentseeker_clip(path: str) -> str:
    return path.split(".mp4")[0].replace("/", "_")


def _momentseeker(reader: VideoRowReader, row, ref) -> RankingExample:
    """MomentSeeker: a text, text+image or text+video query; several correct clips possible."""
    text = reader.text(row, "query", ref)
    given = reader.value(row, "input_frames", ref) or ""
    clips_root = reader.frames / "video_frames"
    if not isinstance(given, str):
        raise BadRow(RowProblem(SCHEMA, ref, "input_frames", f"must be a string, got {type(given).__name__}"))
    if given.endswith(".mp4"):
        query = media_item(text=with_instruction(MOMENTSEEKER_VIDEO, text),
                           video=reader.video(_momentseeker_clip(given), ref, "input_frames", frames=clips_root))
    elif given.lower().endswith(IMAGE_SUFFIXES):
        image = reader.frames / f"query_{given}"
        if not image.is_file():
            raise BadRow(RowProblem(MISSING_VIDEO, ref, "input_frames", f"query image not found: {image}"))
        query = Item(text=with_instruction(MOMENTSEEKER_IMAGE, text), image=str(image))
    else:
        query = Item(text=with_instruction(MOMENTSEEKER_TEXT, text))
    clips: dict[str, list[str]] = {}
    for field in ("positive_frames", "negative_frames"):
        entries = as_list(reader.value(row, field, ref))
        paths = [entry.get("output_path") if isinstance(entry, Mapping) else None for entry in entries or []]
        if entries is None or not all(isinstance(p, str) and p for p in paths):
            raise BadRow(RowProblem(SCHEMA, ref, field, "must be a list of objects with an 'output_path'"))
        clips[field] = [_momentseeker_clip(p) for p in paths]
    options = [(str(clips_root / clip), media_item(text=reader.candidate_text,
                                                   video=reader.video(clip, ref, field, frames=clips_root)))
               for field in ("positive_frames", "negative_frames") for clip in clips[field]]
    correct = [str(clips_root / clip) for clip in clips["positive_frames"]]
    return reader.ranked_against_own(query, options, correct, ref, "positive_frames")


def _lettered(options: list[str]) -> str:
    return "\n".join(f"({chr(ord('A') + number)}) {option}" for number, option in enumerate(options))


def _strip_letter(option: str) -> str:
    """"A. a red ball" -> "a red ball" (how Video-MME and EgoSchema options are written)."""
    head, dot, rest = option.partition(". ")
    return rest.strip() if dot and len(head) <= 2 else option.strip()


def _answer_index(reader: VideoRowReader, row, ref, field: str, count: int, letters: bool = False) -> int:
    value = reader.value(row, field, ref)
    if letters and isinstance(value, str) and len(value.strip()) == 1 and value.strip().isalpha():
        index = ord(value.strip().upper()) - ord("A")
    else:
        try:
            index = int(value)
        except (TypeError, ValueError):
            raise BadRow(RowProblem(SCHEMA, ref, field, f"must be {'a letter or ' if letters else ''}an option "
                                    f"index, got {value!r}")) from None
    if not 0 <= index < count:
        raise BadRow(RowProblem(SCHEMA, ref, field, f"answer {value!r} is outside the {count} options"))
    return index


def _qa(reader: VideoRowReader, row, ref, *, video_field: str, frame_name: str, question: str, options: list[str],
        shown: list[str], answer: int, video_file: str | None = None) -> RankingExample:
    """A multiple-choice question about a video: ``options`` are the candidate ids, ``shown`` their texts."""
    video = reader.video(frame_name, ref, video_field, video_file=video_file)
    query = media_item(text=with_instruction(reader.spec.instruction, question), video=video)
    pairs = [(option, Item(text=text)) for option, text in zip(options, shown)]
    return reader.ranked_against_own(query, pairs, [options[answer]], ref, "answer")


def _videomme(reader: VideoRowReader, row, ref) -> RankingExample:
    video_id, question = reader.text(row, "videoID", ref), reader.text(row, "question", ref)
    options = reader.texts(row, "options", ref)
    answer = _answer_index(reader, row, ref, "answer", len(options), letters=True)
    return _qa(reader, row, ref, video_field="videoID", frame_name=video_id, question=question + "\n" +
               "\n".join(options), options=options, shown=[_strip_letter(o) for o in options], answer=answer)


def _nextqa(reader: VideoRowReader, row, ref) -> RankingExample:
    video_id, question = reader.text(row, "video", ref), reader.text(row, "question", ref)
    options = [reader.text(row, f"a{number}", ref) for number in range(5)]
    answer = _answer_index(reader, row, ref, "answer", len(options))
    return _qa(reader, row, ref, video_field="video", frame_name=video_id,
               question=f"{question}\nOptions:\n{_lettered(options)}", options=options, shown=options, answer=answer)


def _egoschema(reader: VideoRowReader, row, ref) -> RankingExample:
    video_id, question = reader.text(row, "video_idx", ref), reader.text(row, "question", ref)
    options = reader.texts(row, "option", ref)
    answer = _answer_index(reader, row, ref, "answer", len(options))
    return _qa(reader, row, ref, video_field="video_idx", frame_name=video_id,
               question=f"{question} {' '.join(options)}", options=options,
               shown=[_strip_letter(o) for o in options], answer=answer)


def _mvbench(reader: VideoRowReader, row, ref) -> RankingExample:
    subset, video = reader.text(row, "subset", ref), reader.text(row, "video", ref)
    question, answer_text = reader.text(row, "question", ref), reader.text(row, "answer", ref)
    choices = reader.texts(row, "candidates", ref)
    if answer_text not in choices:
        raise BadRow(RowProblem(SCHEMA, ref, "answer", f"{answer_text!r} is not among the candidates {choices}"[:300]))
    lettered = _lettered(choices).split("\n")
    return _qa(reader, row, ref, video_field="video", frame_name=f"{subset}/{video}",
               question=f"{question}\nOptions:\n{_lettered(choices)}", options=lettered, shown=lettered,
               answer=choices.index(answer_text), video_file=f"{subset}/{video}")


def _activitynetqa(reader: VideoRowReader, row, ref) -> RankingExample:
    name, question = reader.text(row, "video_name", ref), reader.text(row, "question", ref)
    answer = reader.text(row, "answer", ref).strip().lower()
    options = ["yes", "no"]
    if answer not in options:
        raise BadRow(RowProblem(SCHEMA, ref, "answer", f"must be 'yes' or 'no', got {answer!r}"))
    return _qa(reader, row, ref, video_field="video_name", frame_name=f"v_{name}",
               question=f"{question}? (A) yes; (B) no.", options=options, shown=options,
               answer=options.index(answer))


FAMILIES: dict[str, Callable[[VideoRowReader, Mapping[str, Any], RowRef], RankingExample]] = {
    "video_cls": _classification,
    "ssv2": _ssv2,
    "msrvtt": _retrieval("video_id", "video", "caption"),
    "msvd": _retrieval("video_id", "video", "caption", caption_list=True),
    "didemo": _retrieval(None, "video", "caption", file_is_basename=True),
    "youcook2": _retrieval("id", "video_path", "sentence", file_is_basename=True),
    "vatex": _vatex,
    "moment": _moment,
    "momentseeker": _momentseeker,
    "videomme": _videomme,
    "nextqa": _nextqa,
    "egoschema": _egoschema,
    "mvbench": _mvbench,
    "activitynetqa": _activitynetqa,
}


def read_video_task(spec: TaskSpec, root: str | os.PathLike, skip_bad: bool = False,
                    report: BadRowReport | None = None) -> RankingTask:
    """One video task of ``root`` as a :class:`RankingTask` (see the module docstring)."""
    return VideoRowReader(spec, root, skip_bad=skip_bad, report=report).read()


__all__ = ["FAMILIES", "SHIPPED_LABELS", "VideoRowReader", "read_video_task", "shipped_labels"]
