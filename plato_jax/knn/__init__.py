"""The exact top-k engine: `search` streams a gallery tile by tile over a device mesh."""
from plato_jax.knn.search import Neighbours, search, search_prefixes
from plato_jax.knn.sources import (ArraySource, ConcatSource, IdRows,
                                   TensorStoreSource, as_source)

__all__ = ["Neighbours", "search", "search_prefixes", "ArraySource", "ConcatSource", "IdRows",
           "TensorStoreSource", "as_source"]
