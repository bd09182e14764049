/*
 * An LD_PRELOAD shim for Debian's user-mode-linux 6.1 (linux.uml) on hosts whose XSAVE area
 * is larger than the one that kernel was built for (AVX-512, AMX: 2.7 to 11 KiB instead of
 * 832 bytes).
 *
 * UML saves and restores each guest thread's FPU state with
 * ptrace(PTRACE_GETREGSET / PTRACE_SETREGSET, NT_X86_XSTATE) into a buffer of its own, fixed
 * size. The host kernel answers a short GETREGSET with the first part of the state, but
 * rejects a SETREGSET that is not the whole standard-format area with EFAULT; the guest's
 * init then dies at its first context switch ("ptrace set fp regs failed, errno = 14").
 *
 * This shim keeps, beside each of UML's buffers (by address), a full-size copy: a short
 * GETREGSET reads the whole state into the copy and hands UML its first part; a short
 * SETREGSET writes the copy back with UML's part laid over it. Every guest thread so keeps its
 * whole register state across switches, as on a host that matches UML's size. Calls of the
 * right size, and every other request, go straight to the kernel.
 *
 * scripts/vm.sh builds it (cc -shared -fPIC) and preloads it into the UML kernel process.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>

#ifndef NT_X86_XSTATE
#define NT_X86_XSTATE 0x202
#endif

/* Larger than any XSAVE area a host has today (AMX: about 11 KiB). */
#define PROBE_SIZE (64 * 1024)
#define MAX_BUFFERS 4096

typedef long (*ptrace_fn)(int, pid_t, void *, void *);

struct full {
    void *uml;      /* UML's buffer */
    char *state;    /* the whole XSAVE area of the thread UML saved into it */
    int filled;     /* `state` holds a thread's state (read at least once) */
};

static struct full buffers[MAX_BUFFERS];
static size_t nbuffers;
static size_t full_size; /* 0: not known yet */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static ptrace_fn real_ptrace(void)
{
    static ptrace_fn real;
    if (!real)
        real = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");
    return real;
}

/* The host's standard-format XSAVE size, read off a whole GETREGSET of `pid`. */
static size_t host_size(pid_t pid)
{
    if (full_size)
        return full_size;
    char *probe = malloc(PROBE_SIZE);
    if (!probe)
        return 0;
    struct iovec iov = { probe, PROBE_SIZE };
    if (real_ptrace()(PTRACE_GETREGSET, pid, (void *)NT_X86_XSTATE, &iov) == 0)
        full_size = iov.iov_len;
    free(probe);
    return full_size;
}

/* The full-size copy kept beside UML's buffer `uml`, made on first use. */
static struct full *copy_of(void *uml)
{
    for (size_t i = 0; i < nbuffers; i++)
        if (buffers[i].uml == uml)
            return &buffers[i];
    if (nbuffers == MAX_BUFFERS)
        return NULL;
    char *state = calloc(1, full_size);
    if (!state)
        return NULL;
    buffers[nbuffers] = (struct full){ uml, state, 0 };
    return &buffers[nbuffers++];
}

static long xstate(int request, pid_t pid, struct iovec *iov)
{
    size_t size = host_size(pid);
    if (!size || iov->iov_len >= size)
        return real_ptrace()(request, pid, (void *)NT_X86_XSTATE, iov);
    struct full *copy = copy_of(iov->iov_base);
    if (!copy) {
        errno = ENOMEM;
        return -1;
    }
    struct iovec whole = { copy->state, size };
    /* A SETREGSET from a buffer never read into starts from the thread's current state. */
    if (request == PTRACE_GETREGSET || !copy->filled) {
        long rc = real_ptrace()(PTRACE_GETREGSET, pid, (void *)NT_X86_XSTATE, &whole);
        if (rc != 0)
            return rc;
        copy->filled = 1;
        whole.iov_len = size;
    }
    if (request == PTRACE_GETREGSET) {
        memcpy(iov->iov_base, copy->state, iov->iov_len);
        return 0;
    }
    memcpy(copy->state, iov->iov_base, iov->iov_len);
    return real_ptrace()(PTRACE_SETREGSET, pid, (void *)NT_X86_XSTATE, &whole);
}

long ptrace(enum __ptrace_request request, ...)
{
    va_list ap;
    va_start(ap, request);
    pid_t pid = va_arg(ap, pid_t);
    void *addr = va_arg(ap, void *);
    void *data = va_arg(ap, void *);
    va_end(ap);
    if ((request == PTRACE_GETREGSET || request == PTRACE_SETREGSET)
        && (unsigned long)addr == NT_X86_XSTATE && data) {
        pthread_mutex_lock(&lock);
        long rc = xstate(request, pid, data);
        int saved = errno;
        pthread_mutex_unlock(&lock);
        errno = saved;
        return rc;
    }
    return real_ptrace()(request, pid, addr, data);
}
