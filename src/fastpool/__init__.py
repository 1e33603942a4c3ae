"""fastpool: a compiled prefork HTTP/1.1 server for WSGI apps.

The hot path lives in the Cython modules ``_http`` (connection core) and
``_wsgi`` (worker loop); ``fastpool.core`` loads them and refuses to run
without them.  Everything that forks, signals, configures or loads is plain
Python: ``cli``, ``settings``, ``master``, ``worker``, ``sockets``, ``loading``.
"""

__version__ = "0.1.0"
