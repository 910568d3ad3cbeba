"""Above the stages: a leased job -> volume -> model (warm) -> typed result -> encoded,
checked objects -> the outbox.

In-process: ``inference`` (the worker thread), ``pool`` (warm models), ``results``.
Remote (issue 12): ``wire`` is the format between the node and a worker on another
machine, ``remote`` that worker (``dicomnode worker``), ``handback``, ``registry`` and
``nodeside`` the node's side of it.
"""
