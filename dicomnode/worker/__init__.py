"""Workers: a job's volume to a model's prediction.

``wire`` is the format between the node and a worker on another machine, ``remote`` that
worker (``dicomnode worker``), ``handback`` and ``registry`` the node's side of it.
"""
