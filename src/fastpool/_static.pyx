# cython: language_level=3
"""Static files, answered by the worker without calling the app.

Rules of this module:

* A group's mounts map URL prefixes to directories.  A request is a static
  hit when it is GET or HEAD, its decoded and normalised path (the rule of
  routes: ``.``/``..`` resolved, slashes merged) falls under a mount on whole
  segments (the longest prefix wins), and the rest of the path names a
  regular file below that directory, or a directory with an ``index.html``.
  Anything else -- another method, no such file, a directory without
  ``index.html``, a path with a segment starting with ``.`` (dotfiles and
  dot-directories), a backslash or NUL -- falls through to the app exactly as
  it arrived (nginx's ``if (!-f $request_filename)``).  A directory named
  without its trailing slash is redirected (301) to the slashed path when it
  has an ``index.html``, as nginx does.
* Nothing outside a mount's directory is opened.  The path is checked as a
  string (above), then opened with ``openat2`` and ``RESOLVE_BENEATH`` under the
  mount's directory, so the kernel refuses any escape, symlinks included
  (``static_follow_symlinks`` lifts that for symlinks only).  A kernel without
  openat2 (before 5.6, or a seccomp filter that refuses it) gets ``openat`` and
  a check of the opened file's real path against the mount's.
* The answer follows nginx: ``Content-Type`` from the extension (``mimetypes``;
  ``charset=utf-8`` for text), ``Last-Modified``, a strong ``ETag`` of mtime and
  size (nginx's ``"mtime-size"`` in hex), ``Accept-Ranges: bytes``,
  ``Cache-Control: public, max-age=N`` when ``static_max_age`` is set.
  ``If-None-Match`` (a list, ``*``, weak comparison) decides a 304 when present,
  else ``If-Modified-Since``.  One ``bytes=`` range gets 206 (``If-Range``
  honoured), an unsatisfiable one 416 with ``Content-Range: bytes */size``;
  several ranges get the whole file (200), where nginx sends multipart.
* With ``static_precompressed``, ``NAME.br`` or ``NAME.gz`` beside the file is
  sent instead when ``Accept-Encoding`` allows it (q-values; br first on a tie),
  with ``Content-Encoding``; its ETag is its own (its mtime and size), and every
  hit says ``Vary: Accept-Encoding``.
* The worker sends the answer (``StaticAnswer``) on its own non-blocking path
  and closes the file; this module never touches a socket.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.errno cimport errno
from posix.types cimport off_t

from fastpool._consts cimport *
from fastpool._http cimport (
    Framing, OutBuffer, Request, frame_body, normalise_path, queue_head, remember,
    split_request_target, status_line_of,
)
from fastpool._posix cimport (
    ENOSYS, EPERM, O_CLOEXEC, O_DIRECTORY, O_NOCTTY, O_NONBLOCK, O_PATH, O_RDONLY,
    RESOLVE_BENEATH, RESOLVE_NO_MAGICLINKS, S_ISDIR, S_ISREG, close as close_fd, fstat, openat,
    openat2, pread, stat,
)

import mimetypes
import os
from email.utils import formatdate, mktime_tz, parsedate_tz

# Types whose text is UTF-8 unless the file says otherwise (text/* too).
cdef frozenset TEXT_TYPES = frozenset({
    "application/javascript", "application/json", "application/xml",
    "application/manifest+json", "image/svg+xml",
})
# Whether openat2 works here; cleared at its first ENOSYS or EPERM.
cdef bint OPENAT2 = True
cdef int OPEN_FLAGS = O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY
# (encoding, suffix) in the order a tie in Accept-Encoding is broken.
cdef tuple ENCODINGS = ((b"br", b".br"), (b"gzip", b".gz"))


def use_openat2(bint on):
    """For tests: turn openat2 off (the fallback of old kernels: openat and a
    real-path check) or back on where the kernel has it."""
    global OPENAT2
    OPENAT2 = on


@cython.final
cdef class StaticFile:
    def __cinit__(self):
        self.fd = -1

    def __dealloc__(self):
        if self.fd >= 0:
            close_fd(self.fd)

    cdef int take(self, int fd, stat *info) except -1:
        """Own ``fd``, and know the version ``info`` describes."""
        self.fd = fd
        self.size = info.st_size
        self.mtime = info.st_mtim.tv_sec
        self.mtime_ns = info.st_mtim.tv_sec * 1000000000 + info.st_mtim.tv_nsec
        self.dev = info.st_dev
        self.ino = info.st_ino
        return 0

    cdef int close(self) except -1:
        if self.fd >= 0:
            close_fd(self.fd)
            self.fd = -1
        return 0


@cython.final
cdef class StaticAnswer:
    def __cinit__(self):
        self.fd = -1

    def __dealloc__(self):
        if self.fd >= 0:
            close_fd(self.fd)

    cpdef close(self):
        """Release the file (the worker calls it when the body is out, or not
        needed; PEP 3333's close() of a response iterable, for the WSGI worker)."""
        if self.fd >= 0:
            close_fd(self.fd)
            self.fd = -1

    cpdef bytes read_all(self):
        """The whole body, read at once (a small file goes out with its head in
        one send).  Shorter than ``length`` when the file shrank meanwhile; the
        worker then closes the connection after the short body."""
        cdef bytes data = PyBytes_FromStringAndSize(NULL, self.length)
        cdef Py_ssize_t done = 0
        cdef ssize_t got
        while done < self.length:
            got = pread(self.fd, PyBytes_AS_STRING(data) + done, self.length - done,
                        <off_t>(self.offset + done))
            if got <= 0:
                break
            done += got
        return data if done == self.length else data[:done]


@cython.final
cdef class StaticFiles:
    """One group's mounts, opened in the worker (see the module's rules)."""

    def __init__(self, mounts, int max_age=0, bint precompressed=True,
                 bint follow_symlinks=False):
        """``mounts``: (URL prefix, directory) pairs; the directories exist."""
        entries = []
        for prefix, directory in mounts:
            fd = os.open(directory, O_PATH | O_DIRECTORY | O_CLOEXEC)
            entries.append((normalise_path(prefix.encode("utf-8")).rstrip(b"/"), fd,
                            os.fsencode(os.path.realpath(directory))))
        self.mounts = sorted(entries, key=lambda entry: -len(entry[0]))
        self.follow_symlinks = follow_symlinks
        self.precompressed = precompressed
        self.cache_control = (b"public, max-age=%d" % max_age) if max_age > 0 else None
        self.validators = {}
        self.types = {}
        self.places = {}

    def __dealloc__(self):
        for entry in self.mounts or ():
            close_fd(<int>entry[1])

    def lookup(self, str method, bytes target, dict headers=None):
        """For tests and tools: ``(status, headers, body)`` of the answer to a
        request (``headers``: lower-case bytes name -> bytes value), or None
        when it falls through to the app."""
        cdef StaticFile found = self.find(method, target)
        cdef StaticAnswer answer
        headers = headers or {}
        if found is None:
            return None
        answer = self.answer(found, method, headers.get(b"if-none-match"),
                             headers.get(b"if-modified-since"), headers.get(b"range"),
                             headers.get(b"if-range"), headers.get(b"accept-encoding"))
        body = answer.read_all() if answer.fd >= 0 else b""
        answer.close()
        return answer.status, answer.headers, body

    # ---- which request is a file

    cdef tuple place(self, bytes target):
        """Where a target would be under the mounts, from the string alone:
        ``(directory fd, its real path, the relative path, whether the path
        ends in "/", the request-target's parts)``, or ``()`` when it is under
        no mount or names a dotfile, NUL or backslash (the app's).  Remembered
        per target (one rule with the other caches, see remember()), so a
        repeated target costs a lookup."""
        cdef object cached = self.places.get(target)
        cdef bytes path, prefix, relative
        cdef Py_ssize_t size
        cdef tuple parts
        cdef tuple where = ()
        if cached is not None:
            return <tuple>cached
        parts = split_request_target(target)
        path = normalise_path(<bytes>parts[0])
        for prefix, root_fd, real in self.mounts:
            size = PyBytes_GET_SIZE(prefix)
            # Whole segments, as routes: /static matches /static and /static/x, not /statics.
            if path.startswith(prefix) and (PyBytes_GET_SIZE(path) == size
                                            or PyBytes_AS_STRING(path)[size] == 47):   # "/"
                relative = path[size:]
                # NUL, backslashes, dotfiles and dot-directories: the app's.
                if not (b"\0" in relative or b"\\" in relative or b"/." in relative):
                    where = (root_fd, real, relative.strip(b"/") or b".", path.endswith(b"/"),
                             parts)
                break
        return <tuple>remember(self.places, target, where, STATIC_PLACE_CACHE_SIZE)

    cdef StaticFile find(self, str method, bytes target):
        """The file (or redirect) for a GET or HEAD, or None: the app answers."""
        cdef bytes relative, real
        cdef int root_fd
        cdef int fd
        cdef stat info
        cdef StaticFile found
        cdef tuple where, parts
        if method != "GET" and method != "HEAD":
            return None
        where = self.place(target)
        if not where:
            return None
        root_fd = <int>where[0]
        real = <bytes>where[1]
        relative = <bytes>where[2]
        fd = self.open_beneath(root_fd, real, relative)
        if fd < 0:
            return None
        if fstat(fd, &info) != 0:
            close_fd(fd)
            return None
        found = StaticFile.__new__(StaticFile)
        found.root_fd = root_fd
        found.root_real = real
        if S_ISDIR(info.st_mode):
            close_fd(fd)
            relative = b"index.html" if relative == b"." else relative + b"/index.html"
            fd = self.open_regular(root_fd, real, relative, &info)
            if fd < 0:
                return None
            if not where[3]:        # named without its trailing slash
                close_fd(fd)
                parts = <tuple>where[4]
                found.location = (<bytes>parts[1] + b"/"
                                  + ((b"?" + <bytes>parts[2]) if parts[2] else b""))
                return found
        elif not S_ISREG(info.st_mode):
            close_fd(fd)
            return None
        found.take(fd, &info)
        found.relative = relative
        found.name = relative.rpartition(b"/")[2]
        return found

    cdef int open_regular(self, int root_fd, bytes root_real, bytes relative,
                          stat *info) except -2:
        """open_beneath, for a regular file only (its stat in ``info``): a
        descriptor, or -1."""
        cdef int fd = self.open_beneath(root_fd, root_real, relative)
        if fd >= 0 and (fstat(fd, info) != 0 or not S_ISREG(info.st_mode)):
            close_fd(fd)
            return -1
        return fd

    cdef int open_beneath(self, int root_fd, bytes root_real, bytes relative) except -2:
        """Open ``relative`` under the mount's directory, never outside it:
        a descriptor, or -1 (no such file, or an escape)."""
        global OPENAT2
        cdef long fd
        if OPENAT2:
            fd = openat2(root_fd, relative, OPEN_FLAGS, RESOLVE_NO_MAGICLINKS
                         | (0 if self.follow_symlinks else RESOLVE_BENEATH))
            if fd >= 0 or (errno != ENOSYS and errno != EPERM):
                return <int>fd
            OPENAT2 = False
        fd = openat(root_fd, relative, OPEN_FLAGS)
        if fd < 0 or self.follow_symlinks:
            return <int>fd
        try:
            real = os.readlink(f"/proc/self/fd/{fd}").encode("utf-8", "surrogateescape")
        except OSError:
            real = b""
        if real != root_real and not real.startswith(root_real + b"/"):
            close_fd(<int>fd)
            return -1
        return <int>fd

    # ---- the answer

    cdef StaticAnswer answer(self, StaticFile found, str method, bytes if_none_match,
                             bytes if_modified_since, bytes range_, bytes if_range,
                             bytes accept_encoding):
        """The response to a found file; takes ownership of its descriptor."""
        cdef StaticAnswer answer = StaticAnswer.__new__(StaticAnswer)
        cdef StaticFile chosen = found
        cdef list headers = []
        cdef tuple span
        cdef bytes etag, modified
        answer.headers = headers
        if found.location is not None:
            answer.status = 301
            headers.append((b"Location", found.location))
            return answer
        if self.precompressed and accept_encoding is not None:
            chosen = self.variant(found, accept_encoding) or found
            if chosen is not found:
                found.close()
        etag, modified = self.validators_of(chosen)
        answer.status = 200
        if if_none_match is not None:
            if etag_listed(if_none_match, etag):
                answer.status = 304
        elif if_modified_since is not None:
            since = http_date(if_modified_since)
            if since is not None and chosen.mtime <= since:
                answer.status = 304
        if answer.status == 304:
            chosen.close()
            headers.append((b"ETag", etag))
            headers.append((b"Last-Modified", modified))
            self.add_caching(headers)
            return answer
        answer.length = chosen.size
        if range_ is not None and method == "GET" and (
                if_range is None or if_range_holds(if_range, etag, chosen.mtime)):
            span = byte_range(range_, chosen.size)
            if span is not None:
                if span[0] < 0:
                    chosen.close()
                    answer.status = 416
                    answer.length = 0
                    headers.append((b"Content-Range", b"bytes */%d" % chosen.size))
                    return answer
                answer.status = 206
                answer.offset = span[0]
                answer.length = span[1] - span[0] + 1
                headers.append((b"Content-Range",
                                b"bytes %d-%d/%d" % (span[0], span[1], chosen.size)))
        headers.append((b"Content-Type", self.content_type(found.name)))
        if chosen.encoding is not None:
            headers.append((b"Content-Encoding", chosen.encoding))
        headers.append((b"Last-Modified", modified))
        headers.append((b"ETag", etag))
        headers.append((b"Accept-Ranges", b"bytes"))
        self.add_caching(headers)
        answer.fd = chosen.fd
        chosen.fd = -1      # the answer owns it now
        return answer

    cdef int add_caching(self, list headers) except -1:
        if self.cache_control is not None:
            headers.append((b"Cache-Control", self.cache_control))
        if self.precompressed:
            headers.append((b"Vary", b"Accept-Encoding"))
        return 0

    cdef StaticFile variant(self, StaticFile found, bytes accept_encoding):
        """The precompressed file beside ``found`` the client prefers, or None."""
        cdef dict weights = codings(accept_encoding)
        cdef double wildcard = weights.get(b"*", 0.0)
        cdef stat info
        cdef int fd
        cdef StaticFile chosen
        ranked = []
        for order, (encoding, suffix) in enumerate(ENCODINGS):
            weight = weights.get(encoding, weights.get(b"x-gzip", wildcard)
                                 if encoding == b"gzip" else wildcard)
            if weight > 0:
                ranked.append((-weight, order, encoding, suffix))
        for _, _, encoding, suffix in sorted(ranked):
            fd = self.open_regular(found.root_fd, found.root_real, found.relative + suffix,
                                   &info)
            if fd < 0:
                continue
            chosen = StaticFile.__new__(StaticFile)
            chosen.take(fd, &info)
            chosen.encoding = encoding
            return chosen
        return None

    cdef bytes content_type(self, bytes name):
        cdef bytes suffix = name.rpartition(b".")[2].lower() if b"." in name else b""
        cdef object known = self.types.get(suffix)
        if known is not None:
            return <bytes>known
        guessed = mimetypes.guess_type("x." + suffix.decode("latin-1"), strict=False)[0]
        if guessed is None:
            value = b"application/octet-stream"
        elif guessed.startswith("text/") or guessed in TEXT_TYPES:
            value = (guessed + "; charset=utf-8").encode("latin-1")
        else:
            value = guessed.encode("latin-1")
        return <bytes>remember(self.types, suffix, value, STATIC_TYPE_CACHE_SIZE)

    cdef tuple validators_of(self, StaticFile found):
        """(ETag, Last-Modified) of a file version, computed once per version."""
        key = (found.dev, found.ino, found.mtime_ns, found.size)
        cached = self.validators.get(key)
        if cached is not None:
            return <tuple>cached
        value = (b'"%x-%x"' % (found.mtime, found.size),
                 formatdate(found.mtime, usegmt=True).encode("ascii"))
        return <tuple>remember(self.validators, key, value, STATIC_VALIDATOR_CACHE_SIZE)


cdef bint queue_answer(StaticAnswer answer, OutBuffer out, Framing *framing, Request request,
                       bint reusable) except -1:
    """Queue an answer's head, and its body when that is empty or up to
    SMALL_FILE bytes (then the file is closed).  True when a larger body is
    still to be sent from ``answer.fd`` (the worker's own non-blocking way)."""
    queue_head(out, framing, request, status_line_of(answer.status), answer.status,
               answer.headers, True, answer.length, reusable)
    if answer.fd < 0 or framing.body_suppressed or answer.length == 0:
        answer.close()
        return False
    if answer.length <= SMALL_FILE:
        frame_body(out, framing, answer.read_all())
        answer.close()
        return False
    return True


# ---------------------------------------------------------------- header values

cdef bint etag_listed(bytes header, bytes etag):
    """If-None-Match: ``*``, or ``etag`` among the listed tags, compared weakly
    (RFC 9110 13.1.2: a W/ prefix does not matter)."""
    cdef bytes tag
    if header.strip() == b"*":
        return True
    for tag in header.split(b","):
        tag = tag.strip()
        if tag.startswith(b"W/"):
            tag = tag[2:]
        if tag == etag:
            return True
    return False


cdef object http_date(bytes value):
    """An HTTP date as a timestamp, or None when it is not one."""
    try:
        parsed = parsedate_tz(value.decode("latin-1"))
        return None if parsed is None else mktime_tz(parsed)
    except Exception:       # the email parser's errors on junk vary by version
        return None


cdef bint if_range_holds(bytes value, bytes etag, long long mtime):
    """If-Range (RFC 9110 13.1.5): the range applies only when the validator
    is the current one -- an ETag compared strongly, or exactly the
    Last-Modified date."""
    value = value.strip()
    if value.startswith(b'"'):
        return value == etag
    if value.startswith(b"W/"):
        return False
    since = http_date(value)
    return since is not None and since == mtime


cdef bint all_digits(bytes text):
    return 0 < PyBytes_GET_SIZE(text) <= 18 and text.isdigit()


cdef tuple byte_range(bytes value, long long size):
    """One ``bytes=`` range as (first, last) within ``size``; (-1, -1) when it
    cannot be satisfied (416); None when the header is to be ignored (not a
    bytes range, bad syntax, several ranges: the whole file is sent)."""
    cdef bytes spec
    cdef long long first, last
    value = value.strip()
    if value[:6].lower() != b"bytes=":
        return None
    spec = value[6:].strip()
    if b"," in spec:
        return None
    if spec.startswith(b"-"):
        if not all_digits(spec[1:]):
            return None
        last = int(spec[1:])
        if last == 0 or size == 0:
            return (-1, -1)
        return (max(size - last, 0), size - 1)
    head, dash, tail = spec.partition(b"-")
    if not dash or not all_digits(head) or (tail and not all_digits(tail)):
        return None
    first = int(head)
    last = int(tail) if tail else size - 1
    if tail and last < first:
        return None
    if first >= size:
        return (-1, -1)
    return (first, min(last, size - 1))


cdef dict codings(bytes header):
    """Accept-Encoding: coding -> weight (q), the codings lower-cased."""
    cdef dict weights = {}
    cdef double weight
    for part in header.split(b","):
        coding, _, params = part.partition(b";")
        coding = coding.strip().lower()
        if not coding:
            continue
        weight = 1.0
        for param in params.split(b";"):
            name, _, number = param.partition(b"=")
            if name.strip().lower() == b"q":
                try:
                    weight = float(number.strip())
                except ValueError:
                    weight = 0.0
        weights[coding] = weight
    return weights
