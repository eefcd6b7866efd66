"""What in a collection is alike: nearest neighbours, near-duplicates and clusters.

    vectors = read_vectors("features.h5", layer="fc7")     # unit-length rows
    for found in NeighborSearch(vectors, k=10):            # every row's 10 nearest
        print(vectors.paths[found.query], found.rows, found.similarities)
    groups = DuplicateSearch(vectors, threshold=0.95).groups()
    clustering = kmeans(vectors.rows, clusters=20, seed=0)

One room each:

    vectors     a layer read through vggfeat.open, each row of unit length
    index       faiss: exact inner-product search, or IVF with its recall measured
    neighbors   the k nearest other rows of every row, or of some
    duplicates  the connected components of the pairs at a threshold or above
    clusters    k-means, numbered by size
    progress    how far a search has got, as events

faiss is the ``search`` extra (``pip install faiss-cpu``, or ``pip install -e '.[search]'``
in a clone).
"""

from vggfeat.search.clusters import Clustering, check_clusters, kmeans
from vggfeat.search.duplicates import DuplicateSearch, Group, check_threshold
from vggfeat.search.index import SEARCHES, Index, IndexReport, SearchUnavailable, require_faiss
from vggfeat.search.neighbors import Neighbors, NeighborSearch, check_k, rows_of
from vggfeat.search.progress import Step
from vggfeat.search.vectors import Vectors, read_vectors

__all__ = [
    "SEARCHES",
    "Clustering",
    "DuplicateSearch",
    "Group",
    "Index",
    "IndexReport",
    "NeighborSearch",
    "Neighbors",
    "SearchUnavailable",
    "Step",
    "Vectors",
    "check_clusters",
    "check_k",
    "check_threshold",
    "kmeans",
    "read_vectors",
    "require_faiss",
    "rows_of",
]
