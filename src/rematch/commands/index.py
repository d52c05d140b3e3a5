"""``rematch index build | add | delete`` and ``rematch search``: a FAISS index of a corpus, kept up to date,
and top-k queries against it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rematch.commands.common import non_negative_int, positive_int
from rematch.commands.loading import add_model_loading_flags


def _model_source(spec: str) -> str:
    """What the manifest records as the model: an absolute path for a local directory, else the spec."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def cmd_build(args: argparse.Namespace) -> int:
    from rematch.commands.loading import load_model
    from rematch.retrieval.corpus import read_corpus
    from rematch.retrieval.index import IndexSpec, build_index

    IndexSpec(index_type=args.index_type, nlist=args.nlist, hnsw_m=args.hnsw_m).validate()  # before any work
    from rematch.distributed import is_main_process, torchrun_session

    corpus = read_corpus(args.corpus, args.image_root, instruction=args.instruction)
    with torchrun_session() as device:  # under torchrun each rank encodes its share of the shards
        if is_main_process():
            print(f"read {len(corpus)} items from {args.corpus}")
        model = load_model(args.model, device or args.device, allow_untrained=args.allow_untrained)
        build_index(model, corpus.items, corpus.ids, args.out, metadata=corpus.metadata, index_type=args.index_type,
                    nlist=args.nlist, hnsw_m=args.hnsw_m, shard_size=args.shard_size, batch_size=args.batch_size,
                    overwrite=args.overwrite, model_source=_model_source(args.model), show_progress=args.progress)
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    from rematch.commands.loading import load_model
    from rematch.distributed import is_main_process, torchrun_session
    from rematch.retrieval.corpus import read_corpus
    from rematch.retrieval.index import index_model_spec, read_manifest
    from rematch.retrieval.index_update import add_to_index

    read_manifest(Path(args.index))  # not an index (or a build still running): one line, before the model loads
    corpus = read_corpus(args.corpus, args.image_root, instruction=args.instruction)
    with torchrun_session() as device:
        if is_main_process():
            print(f"read {len(corpus)} new items from {args.corpus}")
        model = load_model(index_model_spec(args.index, args.model), device or args.device,
                           allow_untrained=args.allow_untrained)
        add_to_index(model, args.index, corpus.items, corpus.ids, metadata=corpus.metadata,
                     shard_size=args.shard_size, batch_size=args.batch_size, show_progress=args.progress)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from rematch.retrieval.index_update import delete_from_index, read_ids

    if not args.ids and not args.ids_file:
        raise SystemExit("rematch index delete: give --ids ID [ID ...] and/or --ids-file FILE")
    ids = list(args.ids or []) + (read_ids(args.ids_file) if args.ids_file else [])
    delete_from_index(args.index, ids)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from rematch.commands.loading import load_model
    from rematch.retrieval.index import Index, index_model_spec

    if args.text is None and args.image is None:
        raise SystemExit("rematch search: give --text and/or --image")
    model = load_model(index_model_spec(args.index, args.model), args.device, allow_untrained=args.allow_untrained)
    index = Index.load(args.index, model=model)
    query = {"text": args.text, "image": args.image, "instruction": args.instruction}
    (hits,) = index.search([{k: v for k, v in query.items() if v is not None}], k=args.k, rerank=args.rerank,
                           nprobe=args.nprobe, ef_search=args.ef_search)
    if args.json:
        print(json.dumps([hit.as_dict() for hit in hits], indent=2, ensure_ascii=False))
        return 0
    for line in format_hits(hits, reranked=bool(args.rerank)):
        print(line)
    return 0


def format_hits(hits, reranked: bool) -> list[str]:
    """One line per hit: rank, cosine, and with a rerank the matching head's p(Yes) the order comes from."""
    if reranked:
        lines = ["rank  cosine   p(Yes)  id  item"]
    else:
        lines = ["rank  cosine   id  item"]
    for hit in hits:
        shown = (hit.metadata.get("text") or hit.metadata.get("image") or "")[:80]
        if reranked:
            p_yes = f"{hit.rerank_score:.4f}" if hit.rerank_score is not None else "     -"
            lines.append(f"{hit.rank:>4}  {hit.score:+.4f}  {p_yes}  {hit.id}  {shown}")
        else:
            lines.append(f"{hit.rank:>4}  {hit.score:+.4f}  {hit.id}  {shown}")
    return lines


def register(sub) -> None:
    index = sub.add_parser("index", help="build a FAISS index of a corpus, or add and delete items")
    actions = index.add_subparsers(dest="index_command", required=True)
    build = actions.add_parser("build", help="encode a corpus as documents into an index directory (resumable)")
    build.add_argument("--model", required=True, help="model directory, hub id, or tiny[:size[:family]]")
    build.add_argument("--corpus", required=True,
                       help="jsonl (id, text, image, instruction, other fields kept as metadata), a directory of "
                            "jsonl files, or a directory of images")
    build.add_argument("--out", required=True, help="index directory to write")
    build.add_argument("--index-type", default="flat", choices=["flat", "ivf", "hnsw"],
                       help="flat = exact inner product; ivf / hnsw = approximate, for large corpora "
                            "(default %(default)s)")
    build.add_argument("--nlist", type=positive_int, default=None,
                       help="IVF lists (default: about 4 * sqrt(n), at least 39 vectors per list)")
    build.add_argument("--hnsw-m", type=positive_int, default=32, help="HNSW links per node (default %(default)s)")
    _encoding_flags(build, "an interrupted build resumes from the last finished shard")
    build.add_argument("--overwrite", action="store_true",
                       help="replace an existing index in --out (default: an existing index is refused)")
    add_model_loading_flags(build)
    build.set_defaults(func=cmd_build)

    add = actions.add_parser("add", help="encode new items into an existing index (resumable; the other items are "
                                         "not encoded again)")
    add.add_argument("--index", required=True, help="index directory to add to")
    add.add_argument("--corpus", required=True,
                     help="the new items: jsonl, a directory of jsonl files, or a directory of images; ids must be "
                          "new to the index")
    add.add_argument("--model", default=None,
                     help="model to encode them (default: the one recorded in the index); it must be the model the "
                          "index was built with")
    _encoding_flags(add, "an interrupted add resumes from the last finished shard")
    add_model_loading_flags(add)
    add.set_defaults(func=cmd_add)

    delete = actions.add_parser("delete", help="remove items from an index by id (no model needed)")
    delete.add_argument("--index", required=True, help="index directory to delete from")
    delete.add_argument("--ids", nargs="+", default=None, metavar="ID", help="ids of the items to remove "
                                                                             "(default: none)")
    delete.add_argument("--ids-file", default=None, metavar="FILE",
                        help="a text file with one id per line to remove (default: none)")
    delete.set_defaults(func=cmd_delete)

    search = sub.add_parser("search", help="top-k items of an index for a text and/or image query")
    search.add_argument("--index", required=True, help="index directory")
    search.add_argument("--model", default=None,
                        help="model to encode the query (default: the one recorded in the index); it must be the "
                             "model the index was built with")
    search.add_argument("--text", default=None, help="query text (default: none; give --text and/or --image)")
    search.add_argument("--image", default=None, help="path of a query image (default: none)")
    search.add_argument("--instruction", default=None, help="task instruction for the query (default: none)")
    search.add_argument("-k", type=positive_int, default=10, help="how many hits to show (default %(default)s)")
    search.add_argument("--rerank", type=non_negative_int, default=0, metavar="N",
                        help="rerank the top N with the matching head and show its p(Yes) beside the cosine "
                             "(default %(default)s: no rerank)")
    search.add_argument("--nprobe", type=positive_int, default=None,
                        help="IVF lists to search (default: the index's, 16)")
    search.add_argument("--ef-search", type=positive_int, default=None,
                        help="HNSW search breadth (default: the index's, 128)")
    search.add_argument("--json", action="store_true", help="print hits as JSON (default: a table)")
    add_model_loading_flags(search)
    search.set_defaults(func=cmd_search)


def _encoding_flags(parser: argparse.ArgumentParser, resume: str) -> None:
    """Flags of the commands that encode a corpus into an index: batching, shards, images, progress."""
    parser.add_argument("--shard-size", type=positive_int, default=4096,
                        help=f"items per shard; {resume} (default %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="items per forward (default %(default)s)")
    parser.add_argument("--image-root", default=None,
                        help="base of relative image paths (default: the jsonl's directory)")
    parser.add_argument("--instruction", default=None, help="instruction for items that have none (default: none)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show an encoding progress bar, as `rematch encode` does (default: shown; "
                             "--no-progress hides it)")
