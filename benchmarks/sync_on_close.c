/* A benchmark aid, not part of the node: preloaded into DCMTK storescp (LD_PRELOAD), it
 * makes storescp flush every file it wrote before closing it (fdatasync) and sync the
 * file's folder (fsync), which is what the node does for every image before acknowledging
 * it. storescp itself syncs nothing, so its figures leave out what durability costs;
 * with this it is measured doing the same disk work as the node.
 *
 * Built by benchmarks/receive.py with the system C compiler (cc -shared -fPIC).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int (*real_close)(int);
static int (*real_fclose)(FILE *);

/* Only regular files opened for writing: not sockets, pipes, /dev/null or read-only files. */
static int written_file(int fd) {
    struct stat st;
    int flags = fcntl(fd, F_GETFL);
    return flags >= 0 && (flags & O_ACCMODE) != O_RDONLY && fstat(fd, &st) == 0 &&
           S_ISREG(st.st_mode);
}

static void sync_file_and_folder(int fd) {
    char link[64];
    char path[4096];
    fdatasync(fd);
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0)
        return;
    path[n] = '\0';
    char *slash = strrchr(path, '/');
    if (slash == NULL || slash == path)
        return;
    *slash = '\0';
    int dir = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir >= 0) {
        fsync(dir);
        if (real_close == NULL)
            real_close = (int (*)(int))dlsym(RTLD_NEXT, "close");
        real_close(dir);
    }
}

int close(int fd) {
    if (real_close == NULL)
        real_close = (int (*)(int))dlsym(RTLD_NEXT, "close");
    if (written_file(fd))
        sync_file_and_folder(fd);
    return real_close(fd);
}

/* glibc's fclose closes through an internal call that close() above does not see. */
int fclose(FILE *stream) {
    if (real_fclose == NULL)
        real_fclose = (int (*)(FILE *))dlsym(RTLD_NEXT, "fclose");
    int fd = fileno(stream);
    if (fd >= 0 && written_file(fd)) {
        fflush(stream);
        sync_file_and_folder(fd);
    }
    return real_fclose(stream);
}
