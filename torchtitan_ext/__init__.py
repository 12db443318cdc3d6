"""torchtitan_ext: DTensor-native 4D training for long-context LLMs on TorchTitan 0.2.2.

Importing the package registers the CPU flash-attention op with torch's context-parallel
dispatcher (``torchtitan_ext.parallel.cpu_ring_attention``), so that torch's own
``context_parallel()`` works on CPU tensors over gloo, and makes gloo groups created from then
on run one worker thread (``torchtitan_ext.distributed.use_single_worker_gloo``: torch's two
race on a string and corrupt the heap when CP's ring keeps two collectives in flight).
"""

from torchtitan_ext.distributed import use_single_worker_gloo as _use_single_worker_gloo
from torchtitan_ext.parallel import cpu_ring_attention as _cpu_ring_attention

__version__ = "0.1.0"

_cpu_ring_attention.enable()
_use_single_worker_gloo()
