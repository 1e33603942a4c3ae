# Declarations of the connection core shared by every worker kind (WSGI today,
# ASGI next): request parsing glue over httptools, limits, and the response
# serialiser.  See _http.pyx for the rules.

cdef class Limits:
    cdef readonly Py_ssize_t request_line
    cdef readonly Py_ssize_t request_fields
    cdef readonly Py_ssize_t request_field_size
    cdef readonly long long request_body
    # Upper bound of a whole request head, derived from the three above; it
    # catches a header that trickles in forever (httptools only reports a
    # header once it is complete).
    cdef readonly Py_ssize_t request_head


cdef class Request:
    cdef public str method
    cdef public bytes target          # the request-target exactly as received
    cdef public int http_minor        # 0 or 1 (HTTP/1.x only)
    cdef public bint keep_alive
    cdef public bint expect_continue
    cdef public bint upgrade
    cdef public bint head_complete
    cdef public bint body_complete
    cdef public long long content_length   # -1 when the request has none
    cdef public bint chunked
    cdef public double started        # monotonic time the first byte arrived
    # Body bytes received and not yet read by the app.
    cdef bytearray body
    cdef Py_ssize_t body_pos
    cdef long long body_received
    cdef bint discard_body

    cdef int append_body(self, bytes chunk) except -1
    cdef Py_ssize_t body_buffered(self)
    cdef bytes take_body(self, Py_ssize_t size)
    cdef Py_ssize_t find_in_body(self, char byte, Py_ssize_t limit)


cdef class HttpConnection:
    cdef object parser
    cdef Limits limits
    # Requests whose head is complete, oldest first (pipelining keeps order).
    cdef public list pending
    cdef Request current
    cdef bytearray url_buffer
    cdef Py_ssize_t header_count
    cdef Py_ssize_t head_bytes
    cdef Py_ssize_t field_bytes
    cdef bint header_seen_in_feed
    cdef bint in_head
    # When non-zero, the stream can no longer be trusted: answer this status
    # after the requests before it, then close.
    cdef public int error_status
    cdef public str error_reason
    cdef public bint stop_reading

    cdef Request new_request(self)
    cdef int add_header(self, Request request, bytes name, bytes value) except -1
    cdef int finish_head(self, Request request) except -1
    cdef int feed(self, bytes data) except -1
    cdef int fail(self, int status, str reason) except -1
    cdef bint at_message_boundary(self)


cdef struct HeadFlags:
    long long content_length
    int status_code
    bint has_date
    bint has_server
    bint connection_close
    bint has_transfer_encoding


cdef class OutBuffer:
    cdef list chunks
    cdef bytearray tail
    cdef Py_ssize_t first_offset
    cdef public Py_ssize_t size

    cdef int write(self, object data) except -1
    cdef bytearray open_tail(self)
    cdef int clear(self) except -1
    cdef Py_ssize_t send_to(self, int fd) except -2


cdef bytes date_header()
cdef int refresh_date() except -1
cdef tuple status_line(str status)
cdef int append_str_header(bytearray out, object name, object value, HeadFlags *flags) except -1
cdef int append_chunk(OutBuffer out, object data) except -1
cpdef bytes error_response(int status, str detail=*)
