"""The exact top-k engine: `search` streams a gallery tile by tile over a device mesh."""
from plato_jax.knn.search import Neighbours, search
from plato_jax.knn.sources import (ArraySource, ConcatSource, IdRows, OrderedSource,
                                   TensorStoreSource, as_source)

__all__ = ["Neighbours", "search", "ArraySource", "ConcatSource", "IdRows", "OrderedSource",
           "TensorStoreSource", "as_source"]
