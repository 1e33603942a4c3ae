"""A module that raises while it is imported (``apps_wsgi_raises:app`` cannot load).

The message is built at run time so that the traceback's source line and the
exception line differ: a test counts the exception line in the server output.
"""

raise RuntimeError("refuses " + "to import: " + __name__)
