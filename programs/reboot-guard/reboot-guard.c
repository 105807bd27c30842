/*
 * reboot-guard: answer the reboot(2) calls of a workflow action that runs in the host's PID
 * namespace, so that the machine restarts only after the agent has reported the action.
 *
 * The runc wrapper (/usr/lib/captainos/runtime/runc) gives such an action a seccomp filter
 * whose only rule sends reboot(2) to a supervisor (SCMP_ACT_NOTIFY). runc connects to our
 * socket (captainos-reboot-guard.socket, Accept=yes: one process per container, the
 * connection on standard input) and sends the container's state as JSON with the filter's
 * notification descriptor (SCM_RIGHTS). For every reboot(2) call we answer what the kernel
 * would answer up to the restart itself: EPERM without CAP_SYS_BOOT, EINVAL for wrong magic
 * numbers or a kexec with no kernel loaded. Restart, halt, power-off and kexec return 0, and
 * once the caller has that answer the request (reboot, halt, poweroff or kexec) is written to
 * RESTART_DIR/request, where captainos-restart waits for the agent's report and then restarts.
 * Ctrl-Alt-Del on/off and suspend go to the kernel unchanged. We end when no process of the
 * container is left (the descriptor reports POLLHUP).
 *
 * Environment (tests): RESTART_DIR (/run/captainos/restart), GUARD_PROC (/proc),
 * GUARD_KEXEC_LOADED (/sys/kernel/kexec_loaded).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/reboot.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#define CAP_SYS_BOOT_BIT 22
#define MAX_STATE (1 << 20) /* runc sends the state in one message; annotations make it grow */

struct answer {
    int error;           /* errno for the caller; 0: the call returns 0 */
    int pass;            /* the kernel runs the call itself */
    const char *request; /* what to restart into once the call returned 0, or NULL */
};

static const char *env_or(const char *name, const char *fallback) {
    const char *value = getenv(name);
    return value && *value ? value : fallback;
}

/* The text is well-formed UTF-8 (RFC 3629: no overlong forms, no surrogates, nothing above
 * U+10FFFF): the lead byte gives the length, E0, ED, F0 and F4 narrow the second byte. */
static int utf8_ok(const unsigned char *c) {
    while (*c) {
        int n = *c < 0x80 ? 0 : *c >= 0xc2 && *c <= 0xdf ? 1 : *c >= 0xe0 && *c <= 0xef ? 2
              : *c >= 0xf0 && *c <= 0xf4 ? 3 : -1;
        if (n < 0)
            return 0;
        unsigned char lo = *c == 0xe0 ? 0xa0 : *c == 0xf0 ? 0x90 : 0x80;
        unsigned char hi = *c == 0xed ? 0x9f : *c == 0xf4 ? 0x8f : 0xbf;
        for (c++; n > 0; n--, c++, lo = 0x80, hi = 0xbf)
            if (*c < lo || *c > hi) /* a NUL ends the text here too */
                return 0;
    }
    return 1;
}

/* A JSON string's contents. Text that is not UTF-8 would make the line no JSON at all: then
 * every byte above 0x7f is "?", as the shell programs' cap_json_escape does. */
static void json_text(FILE *out, const char *text) {
    int utf8 = utf8_ok((const unsigned char *)text);
    for (const unsigned char *c = (const unsigned char *)text; *c; c++) {
        if (*c == '"' || *c == '\\')
            fprintf(out, "\\%c", *c);
        else if (*c < 0x20)
            fprintf(out, "\\u%04x", *c);
        else if (*c >= 0x80 && !utf8)
            fputc('?', out);
        else
            fputc(*c, out);
    }
}

/* One JSON object on stderr (the journal), like the shell programs' cap_log; fields are
 * name/value pairs ending in NULL. */
static void log_line(const char *level, const char *msg, ...) {
    va_list args;
    fprintf(stderr, "{\"level\":\"%s\",\"prog\":\"reboot-guard\",\"msg\":\"", level);
    json_text(stderr, msg);
    fputc('"', stderr);
    va_start(args, msg);
    for (const char *name; (name = va_arg(args, const char *));) {
        fprintf(stderr, ",\"%s\":\"", name);
        json_text(stderr, va_arg(args, const char *));
        fputc('"', stderr);
    }
    va_end(args);
    fputs("}\n", stderr);
    fflush(stderr);
}

/* Read up to size-1 bytes of a small file into buf; -1 when it cannot be read. */
static int read_small(const char *path, char *buf, size_t size) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, size - 1);
    close(fd);
    if (n < 0)
        return -1;
    buf[n] = '\0';
    return 0;
}

/* The process has CAP_SYS_BOOT in its effective set (the kernel checks it first). */
static int capable(const char *proc, uint32_t pid) {
    char path[256], status[8192];
    snprintf(path, sizeof path, "%s/%u/status", proc, pid);
    if (read_small(path, status, sizeof status) < 0)
        return 0;
    const char *line = strstr(status, "\nCapEff:");
    if (!line)
        return 0;
    char *end;
    unsigned long long caps = strtoull(line + strlen("\nCapEff:"), &end, 16);
    return end != line + strlen("\nCapEff:") && (caps >> CAP_SYS_BOOT_BIT) & 1;
}

static int kexec_loaded(const char *path) {
    char text[16];
    return read_small(path, text, sizeof text) == 0 && text[0] == '1';
}

/* The answer to reboot(magic1, magic2, cmd, arg) from process pid. The kernel compares the
 * command as a 32-bit int (Go's unix.Reboot sign-extends it, C does not). */
static struct answer decide(const char *proc, const char *loaded, uint32_t pid, const __u64 args[6]) {
    struct answer a = {0, 0, NULL};
    uint32_t magic2 = (uint32_t)args[1];
    if (!capable(proc, pid))
        a.error = EPERM;
    else if ((uint32_t)args[0] != LINUX_REBOOT_MAGIC1 ||
             (magic2 != LINUX_REBOOT_MAGIC2 && magic2 != LINUX_REBOOT_MAGIC2A &&
              magic2 != LINUX_REBOOT_MAGIC2B && magic2 != LINUX_REBOOT_MAGIC2C))
        a.error = EINVAL;
    else
        switch ((uint32_t)args[2]) {
        case LINUX_REBOOT_CMD_RESTART:
        case LINUX_REBOOT_CMD_RESTART2:
            a.request = "reboot";
            break;
        case LINUX_REBOOT_CMD_HALT:
            a.request = "halt";
            break;
        case LINUX_REBOOT_CMD_POWER_OFF:
            a.request = "poweroff";
            break;
        case LINUX_REBOOT_CMD_KEXEC:
            if (kexec_loaded(loaded))
                a.request = "kexec";
            else
                a.error = EINVAL; /* the kernel's answer when no kernel was loaded */
            break;
        default:
            a.pass = 1;
        }
    return a;
}

/* dir/request := word, through a file in the same directory renamed into place, so that
 * captainos-restart never reads half of it. */
static int write_request(const char *dir, const char *word) {
    char tmp[4096], final[4096];
    if (mkdir(dir, 0700) < 0 && errno != EEXIST)
        return -1;
    snprintf(tmp, sizeof tmp, "%s/.request-%ld", dir, (long)getpid());
    snprintf(final, sizeof final, "%s/request", dir);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    size_t len = strlen(word);
    int ok = write(fd, word, len) == (ssize_t)len && write(fd, "\n", 1) == 1;
    ok = close(fd) == 0 && ok;
    if (!ok || rename(tmp, final) < 0) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

/* Copy into out the value of the first "name": after from in text: a string's contents or a
 * number's digits (IDs and pids hold no quotes or escapes). Not a JSON parser: what the log
 * needs. */
static void scan(const char *text, const char *from, const char *name, char *out, size_t size) {
    char key[64];
    out[0] = '\0';
    const char *at = strstr(text, from);
    snprintf(key, sizeof key, "\"%s\":", name);
    if (!at || !(at = strstr(at + strlen(from), key)))
        return;
    at += strlen(key);
    while (*at == ' ')
        at++;
    size_t n = 0;
    if (*at == '"')
        for (at++; at[n] && at[n] != '"' && at[n] != '\\' && n + 1 < size; n++)
            out[n] = at[n];
    else
        for (; at[n] >= '0' && at[n] <= '9' && n + 1 < size; n++)
            out[n] = at[n];
    out[n] = '\0';
}

int main(void) {
    const char *proc = env_or("GUARD_PROC", "/proc");
    const char *loaded = env_or("GUARD_KEXEC_LOADED", "/sys/kernel/kexec_loaded");
    const char *dir = env_or("RESTART_DIR", "/run/captainos/restart");
    char *state = malloc(MAX_STATE + 1);
    union {
        char buf[CMSG_SPACE(4 * sizeof(int))];
        struct cmsghdr align;
    } control;
    struct iovec iov = {state, MAX_STATE};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                         .msg_controllen = sizeof control.buf};
    /* systemd hands us the accepted connection as standard input. */
    ssize_t got = state ? recvmsg(0, &msg, MSG_CMSG_CLOEXEC) : -1;
    int fd = -1, fds = 0;
    for (struct cmsghdr *c = got >= 0 ? CMSG_FIRSTHDR(&msg) : NULL; c; c = CMSG_NXTHDR(&msg, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
            for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++, fds++)
                memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
    if (got < 0 || fds != 1) {
        char why[128];
        if (got < 0)
            snprintf(why, sizeof why, "no message: %s", strerror(errno));
        else
            snprintf(why, sizeof why, "%d descriptors, not 1", fds);
        log_line("error", "no seccomp descriptor from runc; this container's reboot calls fail", "error", why,
                 (char *)NULL);
        return 1;
    }
    state[got] = '\0';
    char id[256], pid[32];
    scan(state, "\"state\":", "id", id, sizeof id);
    scan(state, "{", "pid", pid, sizeof pid);
    log_line("info", "watching the reboot calls of an action in the host's PID namespace", "container", id,
             "pid", pid, (char *)NULL);

    for (;;) {
        struct pollfd p = {fd, POLLIN, 0};
        if (poll(&p, 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (!(p.revents & POLLIN)) {
            if (p.revents & POLLHUP)
                return 0; /* no process uses the filter any more */
            continue;
        }
        struct seccomp_notif req;
        memset(&req, 0, sizeof req); /* the kernel refuses a buffer that is not zeroed */
        if (ioctl(fd, SECCOMP_IOCTL_NOTIF_RECV, &req) < 0) {
            if (errno == EINTR || errno == ENOENT) /* interrupted, or the caller died first */
                continue;
            break;
        }
        struct answer a = decide(proc, loaded, req.pid, req.data.args);
        struct seccomp_notif_resp resp = {req.id, 0, -a.error, a.pass ? SECCOMP_USER_NOTIF_FLAG_CONTINUE : 0};
        int sent = ioctl(fd, SECCOMP_IOCTL_NOTIF_SEND, &resp) == 0;
        char caller[32];
        snprintf(caller, sizeof caller, "%u", req.pid);
        /* Only a call that returned 0 to a living caller asks for a restart: an action killed
         * meanwhile (its deadline) restarts nothing. */
        if (!sent)
            log_line("warning", "the caller was gone before the answer; nothing requested", "container", id,
                     "caller", caller, (char *)NULL);
        else if (a.request && write_request(dir, a.request) < 0) {
            log_line("error", "could not write the restart request", "container", id, "request", a.request,
                     "error", strerror(errno), (char *)NULL);
            return 1;
        } else if (a.request)
            log_line("info", "reboot call deferred until the agent's report", "container", id, "caller", caller,
                     "request", a.request, (char *)NULL);
        else if (a.pass)
            log_line("info", "reboot call that restarts nothing passed to the kernel", "container", id, "caller",
                     caller, (char *)NULL);
        else
            log_line("warning", "reboot call refused as the kernel would", "container", id, "caller", caller,
                     "error", strerror(a.error), (char *)NULL);
    }
    log_line("error", "stopped answering reboot calls", "container", id, "error", strerror(errno), (char *)NULL);
    return 1;
}
