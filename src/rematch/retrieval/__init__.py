"""Retrieval: FAISS indexes of document embeddings, corpus files, and the rerank hook.

    from rematch.retrieval import Index, build_index
    index = Index.build(model, items, ids); index.save("my-index")
    index = Index.load("my-index", model=model); hits = index.search("a red circle", k=5)
    add_to_index(model, "my-index", new_items, new_ids); delete_from_index("my-index", ["id-3"])
"""

from rematch.retrieval.corpus import Corpus, CorpusError, read_corpus
from rematch.retrieval.index import (
    IncompleteIndexError,
    Index,
    IndexFormatError,
    IndexSpec,
    ModelMismatchError,
    SearchHit,
    build_index,
    open_index,
)
from rematch.retrieval.index_update import add_to_index, delete_from_index

__all__ = ["Corpus", "CorpusError", "IncompleteIndexError", "Index", "IndexFormatError", "IndexSpec",
           "ModelMismatchError", "SearchHit", "add_to_index", "build_index", "delete_from_index", "open_index",
           "read_corpus"]
