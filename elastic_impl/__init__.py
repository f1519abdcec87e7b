"""elastic_impl: an independent implementation of the torch.distributed.elastic runtime.

Module paths mirror ``torch.distributed.elastic``: ``torch.distributed.elastic.X.Y`` is ``elastic_impl.X.Y``.
"""

__version__ = "0.1.0"
