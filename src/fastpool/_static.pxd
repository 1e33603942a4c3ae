# Static files served by the worker itself, for every worker kind (see
# _static.pyx for the rules): which request is a file, and the answer to it.

from fastpool._http cimport Framing, OutBuffer, Request
from fastpool._posix cimport stat

cdef class StaticFile:
    """A regular file found under a mount (open), or a directory's redirect."""
    cdef int fd                    # -1 for a redirect
    cdef readonly bytes name       # the file's last path segment (its type comes from it)
    cdef readonly bytes location   # a redirect's Location (a directory without its slash)
    cdef readonly bytes encoding   # a precompressed variant's Content-Encoding, else None
    cdef int root_fd               # the mount's directory (precompressed variants are beside)
    cdef bytes root_real           # its real path (the check when openat2 is missing)
    cdef bytes relative            # the path below the mount
    cdef long long size
    cdef long long mtime           # seconds
    cdef long long mtime_ns
    cdef unsigned long long dev
    cdef unsigned long long ino

    cdef int take(self, int fd, stat *info) except -1
    cdef int close(self) except -1


cdef class StaticAnswer:
    """What to send: a status, byte-pair headers, then ``length`` bytes of
    ``fd`` from ``offset`` (none when fd is -1).  close() releases the file."""
    cdef readonly int status
    cdef readonly list headers
    cdef readonly int fd
    cdef readonly long long offset
    cdef readonly long long length

    cpdef close(self)
    cpdef bytes read_all(self)


cdef class StaticFiles:
    cdef list mounts               # [(prefix bytes, directory fd, real path bytes)], longest first
    cdef bint follow_symlinks
    cdef bint precompressed
    cdef bytes cache_control       # b"public, max-age=N", or None
    cdef dict validators           # (dev, ino, mtime_ns, size) -> (ETag, Last-Modified)
    cdef dict types                # file name suffix -> Content-Type
    cdef dict places               # request-target -> place(), () when not a mount's

    cdef tuple place(self, bytes target)
    cdef StaticFile find(self, str method, bytes target)
    cdef StaticAnswer answer(self, StaticFile found, str method, bytes if_none_match,
                             bytes if_modified_since, bytes range_, bytes if_range,
                             bytes accept_encoding)
    cdef int open_beneath(self, int root_fd, bytes root_real, bytes relative) except -2
    cdef int open_regular(self, int root_fd, bytes root_real, bytes relative,
                          stat *info) except -2
    cdef StaticFile variant(self, StaticFile found, bytes accept_encoding)
    cdef int add_caching(self, list headers) except -1
    cdef bytes content_type(self, bytes name)
    cdef tuple validators_of(self, StaticFile found)


cdef bint queue_answer(StaticAnswer answer, OutBuffer out, Framing *framing, Request request,
                       bint reusable) except -1
