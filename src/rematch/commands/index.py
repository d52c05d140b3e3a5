"""``rematch index build`` and ``rematch search``: a FAISS index of a corpus, and top-k queries against it."""

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
    for hit in hits:
        shown = hit.metadata.get("text") or hit.metadata.get("image") or ""
        print(f"{hit.rank:>3}  {hit.score:+.4f}  {hit.id}  {shown[:80]}")
    return 0


def register(sub) -> None:
    index = sub.add_parser("index", help="build a FAISS index of a corpus")
    actions = index.add_subparsers(dest="index_command", required=True)
    build = actions.add_parser("build", help="encode a corpus as documents into an index directory (resumable)")
    build.add_argument("--model", required=True, help="model directory, hub id, or tiny[:size[:family]]")
    build.add_argument("--corpus", required=True,
                       help="jsonl (id, text, image, instruction, other fields kept as metadata), a directory of "
                            "jsonl files, or a directory of images")
    build.add_argument("--out", required=True, help="index directory to write")
    build.add_argument("--index-type", default="flat", choices=["flat", "ivf", "hnsw"],
                       help="flat = exact inner product (default); ivf / hnsw = approximate, for large corpora")
    build.add_argument("--nlist", type=positive_int, default=None, help="IVF lists (default ~4*sqrt(n))")
    build.add_argument("--hnsw-m", type=positive_int, default=32, help="HNSW links per node")
    build.add_argument("--shard-size", type=positive_int, default=4096,
                       help="items per shard; an interrupted build resumes from the last finished shard")
    build.add_argument("--batch-size", type=positive_int, default=16)
    build.add_argument("--image-root", default=None, help="base of relative image paths (default: the jsonl's "
                                                          "directory)")
    build.add_argument("--instruction", default=None, help="instruction for items that have none")
    build.add_argument("--overwrite", action="store_true", help="replace an existing index in --out")
    add_model_loading_flags(build)
    build.add_argument("--progress", action="store_true")
    build.set_defaults(func=cmd_build)

    search = sub.add_parser("search", help="top-k items of an index for a text and/or image query")
    search.add_argument("--index", required=True, help="index directory")
    search.add_argument("--model", default=None,
                        help="model to encode the query (default: the one recorded in the index); it must be the "
                             "model the index was built with")
    search.add_argument("--text", default=None)
    search.add_argument("--image", default=None, help="path of a query image")
    search.add_argument("--instruction", default=None, help="task instruction for the query")
    search.add_argument("-k", type=positive_int, default=10)
    search.add_argument("--rerank", type=non_negative_int, default=0, metavar="N",
                        help="rerank the top N with the matching head (p(Yes) of the generative branch)")
    search.add_argument("--nprobe", type=positive_int, default=None, help="IVF lists to search")
    search.add_argument("--ef-search", type=positive_int, default=None, help="HNSW search breadth")
    search.add_argument("--json", action="store_true", help="print hits as JSON")
    add_model_loading_flags(search)
    search.set_defaults(func=cmd_search)
