/*
 * Test double for libkrun: the exported functions boxlite calls, with the SAME C signatures
 * as libkrun.h, so the real cffi binding and launcher run against it unchanged. No VM here:
 * each call appends "name(args...)" to the file named by $KRUN_DOUBLE_LOG.
 *
 *   KRUN_DOUBLE_FAIL=name[:errno]  that call returns -errno (default EINVAL)
 *   KRUN_DOUBLE_ENTER=exit[:code]  krun_start_enter logs, then _exit(code) (default 0)
 *   KRUN_DOUBLE_ENTER=serve        binds+listens on the vsock_port2 socket, sleeps until killed
 *   KRUN_DOUBLE_ENTER=return       krun_start_enter returns -EINVAL (bad config at start)
 *   KRUN_DOUBLE_NO_BLK=1           krun_has_feature(BLK) answers 0
 *   KRUN_DOUBLE_CONSOLE=N          krun_start_enter first opens the krun_set_console_output
 *                                  path as libkrun does (create/truncate, write-only) and writes
 *                                  N bytes of numbered lines + "console end", as a guest
 *                                  flooding hvc0 would (stops at the first failed write)
 *   KRUN_DOUBLE_STDERR=N           likewise N bytes of libkrun-style error lines to stderr
 *
 * Build with -DOLD_API to leave out the newer symbols (add_disk2, virtiofs3, vsock_port2,
 * disable_implicit_vsock, add_vsock, has_feature), like an old libkrun.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define CTX_ID 5

static char vsock_path[108];
static char console_path[4096];

static void logf_(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void logf_(const char *fmt, ...)
{
    const char *path = getenv("KRUN_DOUBLE_LOG");
    if (!path)
        return;
    FILE *f = fopen(path, "a");
    if (!f)
        return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(f, fmt, ap);
    va_end(ap);
    fputc('\n', f);
    fclose(f);
}

/* -errno if $KRUN_DOUBLE_FAIL names this call, else 0 */
static int32_t injected(const char *name)
{
    const char *spec = getenv("KRUN_DOUBLE_FAIL");
    if (!spec)
        return 0;
    size_t n = strlen(name);
    if (strncmp(spec, name, n) != 0 || (spec[n] != '\0' && spec[n] != ':'))
        return 0;
    return spec[n] == ':' ? -atoi(spec + n + 1) : -EINVAL;
}

static const char *s(const char *p) { return p ? p : "NULL"; }

static void fmt_array(char *out, size_t size, const char *const arr[])
{
    size_t used = 0;
    if (!arr) {
        snprintf(out, size, "NULL");
        return;
    }
    used += snprintf(out + used, size - used, "[");
    for (int i = 0; arr[i] && used < size; i++)
        used += snprintf(out + used, size - used, "%s%s", i ? "," : "", arr[i]);
    if (used < size)
        snprintf(out + used, size - used, "]");
}

#define RET(name) return injected(name)

int32_t krun_set_log_level(uint32_t level)
{
    logf_("krun_set_log_level(%u)", level);
    RET("krun_set_log_level");
}

int32_t krun_create_ctx(void)
{
    logf_("krun_create_ctx()");
    int32_t rc = injected("krun_create_ctx");
    return rc ? rc : CTX_ID;
}

int32_t krun_free_ctx(uint32_t ctx)
{
    logf_("krun_free_ctx(%u)", ctx);
    RET("krun_free_ctx");
}

int32_t krun_set_vm_config(uint32_t ctx, uint8_t num_vcpus, uint32_t ram_mib)
{
    logf_("krun_set_vm_config(%u,%u,%u)", ctx, num_vcpus, ram_mib);
    RET("krun_set_vm_config");
}

int32_t krun_set_root(uint32_t ctx, const char *root_path)
{
    logf_("krun_set_root(%u,%s)", ctx, s(root_path));
    RET("krun_set_root");
}

int32_t krun_add_disk(uint32_t ctx, const char *block_id, const char *disk_path, bool read_only)
{
    logf_("krun_add_disk(%u,%s,%s,%d)", ctx, s(block_id), s(disk_path), read_only);
    RET("krun_add_disk");
}

int32_t krun_add_virtiofs(uint32_t ctx, const char *tag, const char *path)
{
    logf_("krun_add_virtiofs(%u,%s,%s)", ctx, s(tag), s(path));
    RET("krun_add_virtiofs");
}

int32_t krun_add_vsock_port(uint32_t ctx, uint32_t port, const char *path)
{
    logf_("krun_add_vsock_port(%u,%u,%s)", ctx, port, s(path));
    RET("krun_add_vsock_port");
}

int32_t krun_set_exec(uint32_t ctx, const char *exec_path, const char *const argv[],
                      const char *const envp[])
{
    char a[1024], e[1024];
    fmt_array(a, sizeof a, argv);
    fmt_array(e, sizeof e, envp);
    logf_("krun_set_exec(%u,%s,%s,%s)", ctx, s(exec_path), a, e);
    RET("krun_set_exec");
}

int32_t krun_set_env(uint32_t ctx, const char *const envp[])
{
    char e[1024];
    fmt_array(e, sizeof e, envp);
    logf_("krun_set_env(%u,%s)", ctx, e);
    RET("krun_set_env");
}

int32_t krun_set_workdir(uint32_t ctx, const char *workdir)
{
    logf_("krun_set_workdir(%u,%s)", ctx, s(workdir));
    RET("krun_set_workdir");
}

int32_t krun_set_kernel(uint32_t ctx, const char *kernel_path, uint32_t kernel_format,
                        const char *initramfs, const char *cmdline)
{
    logf_("krun_set_kernel(%u,%s,%u,%s,%s)", ctx, s(kernel_path), kernel_format, s(initramfs),
          s(cmdline));
    RET("krun_set_kernel");
}

int32_t krun_set_console_output(uint32_t ctx, const char *path)
{
    logf_("krun_set_console_output(%u,%s)", ctx, s(path));
    if (path)
        snprintf(console_path, sizeof console_path, "%s", path);
    RET("krun_set_console_output");
}

#ifndef OLD_API
int32_t krun_add_disk2(uint32_t ctx, const char *block_id, const char *disk_path,
                       uint32_t disk_format, bool read_only)
{
    logf_("krun_add_disk2(%u,%s,%s,%u,%d)", ctx, s(block_id), s(disk_path), disk_format,
          read_only);
    RET("krun_add_disk2");
}

int32_t krun_add_virtiofs3(uint32_t ctx, const char *tag, const char *path, uint64_t shm_size,
                           bool read_only)
{
    logf_("krun_add_virtiofs3(%u,%s,%s,%" PRIu64 ",%d)", ctx, s(tag), s(path), shm_size,
          read_only);
    RET("krun_add_virtiofs3");
}

int32_t krun_add_vsock_port2(uint32_t ctx, uint32_t port, const char *path, bool listen)
{
    logf_("krun_add_vsock_port2(%u,%u,%s,%d)", ctx, port, s(path), listen);
    if (path)
        snprintf(vsock_path, sizeof vsock_path, "%s", path);
    RET("krun_add_vsock_port2");
}

int32_t krun_add_vsock(uint32_t ctx, uint32_t tsi_features)
{
    logf_("krun_add_vsock(%u,%u)", ctx, tsi_features);
    RET("krun_add_vsock");
}

int32_t krun_disable_implicit_vsock(uint32_t ctx)
{
    logf_("krun_disable_implicit_vsock(%u)", ctx);
    RET("krun_disable_implicit_vsock");
}

int32_t krun_has_feature(uint64_t feature)
{
    logf_("krun_has_feature(%" PRIu64 ")", feature);
    int32_t rc = injected("krun_has_feature");
    if (rc)
        return rc;
    return getenv("KRUN_DOUBLE_NO_BLK") && feature == 1 ? 0 : 1;
}
#endif

/* write about `total` bytes of numbered lines, then `last`, to fd; stop at the first error */
static void flood(int fd, const char *what, long total, const char *last)
{
    char line[128];
    for (long i = 0, sent = 0; sent < total; i++) {
        int n = snprintf(line, sizeof line, "%s line %09ld: the guest keeps writing\n", what, i);
        if (write(fd, line, n) != n)
            return;
        sent += n;
    }
    if (write(fd, last, strlen(last)) < 0)
        return;
}

int32_t krun_start_enter(uint32_t ctx)
{
    logf_("krun_start_enter(%u)", ctx);
    int32_t rc = injected("krun_start_enter");
    if (rc)
        return rc;
    const char *console_bytes = getenv("KRUN_DOUBLE_CONSOLE");
    if (console_bytes && console_path[0]) {
        /* what Rust's File::create does: O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, mode 0666 */
        int fd = open(console_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
        if (fd < 0)
            _exit(4);
        flood(fd, "console", atol(console_bytes), "console end\n");
        /* kept open, as libkrun keeps its console output until the VM exits */
    }
    const char *stderr_bytes = getenv("KRUN_DOUBLE_STDERR");
    if (stderr_bytes)
        flood(2, "[ERROR devices::virtio] stderr", atol(stderr_bytes), "stderr end\n");
    const char *mode = getenv("KRUN_DOUBLE_ENTER");
    if (!mode)
        mode = "exit";
    if (strcmp(mode, "return") == 0)
        return -EINVAL;
    if (strcmp(mode, "serve") == 0) {
        if (vsock_path[0]) {
            int fd = socket(AF_UNIX, SOCK_STREAM, 0);
            struct sockaddr_un addr = {.sun_family = AF_UNIX};
            snprintf(addr.sun_path, sizeof addr.sun_path, "%s", vsock_path);
            if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 4) < 0)
                _exit(3);
        }
        for (;;)
            pause();
    }
    _exit(strncmp(mode, "exit:", 5) == 0 ? atoi(mode + 5) : 0);
}
