"""Generated data sets and their metrics, for tests and benchmarks (no downloads).

- :class:`SyntheticCTR`: click-through-rate examples with Zipf-distributed categorical ids;
- :func:`normalized_entropy`, :func:`auc`: the usual CTR quality metrics.
"""

from dtune.data._ctr import CTRBatch, SyntheticCTR
from dtune.data._metrics import auc, normalized_entropy

__all__ = ["CTRBatch", "SyntheticCTR", "auc", "normalized_entropy"]
