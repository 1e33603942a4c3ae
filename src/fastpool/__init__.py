"""fastpool: a compiled prefork HTTP/1.1 server for WSGI and ASGI apps.

The hot path lives in the Cython modules ``_http`` (connection core),
``_worker`` (the worker base), ``_wsgi`` and ``_asgi`` (the two worker kinds);
``fastpool.core`` checks them and refuses to run without them.  Everything
that forks, signals, configures or loads is plain Python (README's "How it
works" lists the modules).
"""

__version__ = "0.1.0"
