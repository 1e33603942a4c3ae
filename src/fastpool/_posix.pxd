# C declarations of the Linux system calls the compiled worker uses.
#
# Rules: declarations only (no code); every function that can block is declared
# ``nogil`` so that callers can release the GIL around it and only around it.

from libc.stdint cimport uint32_t, uint64_t
from posix.types cimport off_t


cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EAGAIN
        EWOULDBLOCK  # = EAGAIN on Linux: test EAGAIN only (a switch on both fails to compile)
        EINTR
        EMFILE
        ENFILE
        ENOBUFS
        ENOMEM
        ECONNABORTED
        EPROTO
        EPERM
        ENOSYS


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64

    struct epoll_event:
        uint32_t events
        epoll_data_t data

    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP
        EPOLLEXCLUSIVE
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t

    struct sockaddr:
        sa_family_t sa_family

    struct sockaddr_storage:
        sa_family_t ss_family

    enum:
        AF_INET
        AF_INET6
        AF_UNIX
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        MSG_NOSIGNAL
        MSG_DONTWAIT
        MSG_PEEK
        SHUT_WR
        SOL_SOCKET
        IPPROTO_TCP

    int accept4(int sockfd, sockaddr *addr, socklen_t *addrlen, int flags)
    ssize_t recv(int sockfd, void *buf, size_t len, int flags)
    ssize_t send(int sockfd, const void *buf, size_t len, int flags)
    int shutdown(int sockfd, int how)
    int setsockopt(int sockfd, int level, int optname, const void *optval, socklen_t optlen)
    int getsockopt(int sockfd, int level, int optname, void *optval, socklen_t *optlen)
    int getpeername(int sockfd, sockaddr *addr, socklen_t *addrlen)
    int getsockname(int sockfd, sockaddr *addr, socklen_t *addrlen)


cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr

    struct in6_addr:
        unsigned char s6_addr[16]

    struct sockaddr_in:
        sa_family_t sin_family
        unsigned short sin_port
        in_addr sin_addr

    struct sockaddr_in6:
        sa_family_t sin6_family
        unsigned short sin6_port
        in6_addr sin6_addr

    unsigned short ntohs(unsigned short netshort)


cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY
        TCP_CORK
        TCP_INFO

    # The fields admission control reads (Linux): on a listening socket,
    # tcpi_unacked is its accept queue's length; on a connection,
    # tcpi_last_data_recv is how long ago (ms) its last bytes arrived.
    struct tcp_info:
        unsigned int tcpi_unacked
        unsigned int tcpi_sacked
        unsigned int tcpi_last_data_recv


cdef extern from "<arpa/inet.h>" nogil:
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)
    int inet_pton(int af, const char *src, void *dst)
    enum:
        INET6_ADDRSTRLEN


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len

    ssize_t writev(int fd, const iovec *iov, int iovcnt)


# Messages with descriptors attached (SCM_RIGHTS): the handoff queues.
cdef extern from "<sys/socket.h>" nogil:
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags

    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type

    enum:
        SCM_RIGHTS
        MSG_CMSG_CLOEXEC
        MSG_CTRUNC

    ssize_t sendmsg(int sockfd, const msghdr *msg, int flags)
    ssize_t recvmsg(int sockfd, msghdr *msg, int flags)
    cmsghdr *CMSG_FIRSTHDR(msghdr *msg)
    cmsghdr *CMSG_NXTHDR(msghdr *msg, cmsghdr *cmsg)
    unsigned char *CMSG_DATA(cmsghdr *cmsg)
    size_t CMSG_SPACE(size_t length)
    size_t CMSG_LEN(size_t length)


cdef extern from "<sys/mman.h>" nogil:
    enum:
        MFD_CLOEXEC
    int memfd_create(const char *name, unsigned int flags)


cdef extern from "<sys/sendfile.h>" nogil:
    ssize_t sendfile(int out_fd, int in_fd, off_t *offset, size_t count)


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents

    enum:
        POLLIN
        POLLOUT
        POLLERR
        POLLHUP

    int poll(pollfd *fds, unsigned long nfds, int timeout)


cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    int getppid()
    ssize_t write(int fd, const void *buf, size_t count)


cdef extern from "<time.h>" nogil:
    ctypedef long time_t

    struct timespec:
        time_t tv_sec
        long tv_nsec

    enum:
        CLOCK_MONOTONIC

    int clock_gettime(int clk_id, timespec *tp)
    time_t time(time_t *tloc)


cdef extern from "<fcntl.h>" nogil:
    enum:
        O_RDONLY
        O_CLOEXEC
        O_NONBLOCK
        O_NOCTTY
        O_NOFOLLOW
        O_DIRECTORY
        O_PATH
        F_GETFL
        F_SETFL
    int openat(int dirfd, const char *pathname, int flags)
    int fcntl(int fd, int cmd, ...)


cdef extern from "<sys/stat.h>" nogil:
    ctypedef unsigned long dev_t
    ctypedef unsigned long ino_t
    ctypedef unsigned int mode_t

    struct stat:
        dev_t st_dev
        ino_t st_ino
        mode_t st_mode
        off_t st_size
        timespec st_mtim

    int fstat(int fd, stat *buf)
    bint S_ISREG(mode_t mode)
    bint S_ISDIR(mode_t mode)


cdef extern from "<unistd.h>" nogil:
    ssize_t pread(int fd, void *buf, size_t count, off_t offset)


cdef extern from *:
    """
    #include <sys/syscall.h>
    #include <stdint.h>
    /* openat2(2) (Linux 5.6): the kernel resolves a path beneath a directory.
       Declared here because older C libraries have no wrapper or header. */
    struct fastpool_open_how { uint64_t flags; uint64_t mode; uint64_t resolve; };
    #define FASTPOOL_RESOLVE_NO_MAGICLINKS 0x02
    #define FASTPOOL_RESOLVE_BENEATH 0x08
    static inline long fastpool_openat2(int dirfd, const char *path, uint64_t flags,
                                        uint64_t resolve) {
        struct fastpool_open_how how = {flags, 0, resolve};
        return syscall(437 /* SYS_openat2, the same on every architecture */,
                       dirfd, path, &how, sizeof how);
    }
    """
    long openat2 "fastpool_openat2"(int dirfd, const char *path, unsigned long long flags,
                                    unsigned long long resolve) nogil
    enum:
        RESOLVE_NO_MAGICLINKS "FASTPOOL_RESOLVE_NO_MAGICLINKS"
        RESOLVE_BENEATH "FASTPOOL_RESOLVE_BENEATH"
