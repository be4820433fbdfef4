#include "fsutil.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int mkdir_p(const char *path, mode_t mode, struct err *e)
{
	char buf[512];
	size_t n = strlen(path);
	if (n == 0 || n >= sizeof buf)
		return err_set(e, C_INVALID_ARGUMENT, "mkdir %s: bad path", path);
	memcpy(buf, path, n + 1);
	for (char *p = buf + 1;; p++) {
		if (*p != '/' && *p != 0)
			continue;
		char saved = *p;
		*p = 0;
		if (mkdir(buf, mode) < 0 && errno != EEXIST)
			return err_sys(e, "mkdir %s", buf);
		*p = saved;
		if (!saved)
			break;
	}
	struct stat st;
	if (stat(path, &st) < 0)
		return err_sys(e, "stat %s", path);
	if (!S_ISDIR(st.st_mode))
		return err_errno(e, ENOTDIR, "mkdir %s", path);
	return 0;
}

int write_all(int fd, const void *data, size_t len, const char *path, struct err *e)
{
	const char *p = data;
	while (len) {
		ssize_t n = write(fd, p, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return err_sys(e, "write %s", path);
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

int write_file(const char *path, const void *data, size_t len, mode_t mode, struct err *e)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
	if (fd < 0)
		return err_sys(e, "open %s", path);
	if (write_all(fd, data, len, path, e) < 0) {
		close(fd);
		return -1;
	}
	if (close(fd) < 0)
		return err_sys(e, "close %s", path);
	return 0;
}

int read_file(const char *path, char *buf, size_t cap, size_t *len, struct err *e)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return err_sys(e, "open %s", path);
	size_t got = 0;
	while (got < cap - 1) {
		ssize_t n = read(fd, buf + got, cap - 1 - got);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			err_sys(e, "read %s", path);
			close(fd);
			return -1;
		}
		if (n == 0)
			break;
		got += (size_t)n;
	}
	close(fd);
	buf[got] = 0;
	if (len)
		*len = got;
	return 0;
}

static int rm_at(int dirfd, const char *name, dev_t dev, int depth, const char *top, struct err *e)
{
	struct stat st;
	if (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
		if (errno == ENOENT)
			return 0;
		return err_sys(e, "stat %s/%s", top, name);
	}
	if (!S_ISDIR(st.st_mode)) {
		if (unlinkat(dirfd, name, 0) < 0 && errno != ENOENT)
			return err_sys(e, "unlink %s/%s", top, name);
		return 0;
	}
	if (st.st_dev != dev)
		return err_set(e, C_FAILED_PRECONDITION, "remove %s/%s: a mount point", top, name);
	if (depth > 32)
		return err_set(e, C_INTERNAL, "remove %s: tree too deep", top);
	int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return err_sys(e, "open %s/%s", top, name);
	DIR *d = fdopendir(fd);
	if (!d) {
		close(fd);
		return err_sys(e, "opendir %s/%s", top, name);
	}
	int rc = 0;
	struct dirent *de;
	while (rc == 0 && (errno = 0, de = readdir(d))) {
		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		rc = rm_at(fd, de->d_name, dev, depth + 1, top, e);
	}
	closedir(d);
	if (rc)
		return rc;
	if (unlinkat(dirfd, name, AT_REMOVEDIR) < 0 && errno != ENOENT)
		return err_sys(e, "rmdir %s/%s", top, name);
	return 0;
}

int rm_rf(const char *path, struct err *e)
{
	struct stat st;
	if (lstat(path, &st) < 0) {
		if (errno == ENOENT)
			return 0;
		return err_sys(e, "stat %s", path);
	}
	return rm_at(AT_FDCWD, path, st.st_dev, 0, path, e);
}

unsigned long long parse_u64(const char *s)
{
	while (*s == ' ' || *s == '\t')
		s++;
	if (!strncmp(s, "max", 3))
		return 0;
	return strtoull(s, NULL, 10);
}

unsigned long long kv_u64(const char *text, const char *key)
{
	size_t k = strlen(key);
	for (const char *p = text; p && *p;) {
		if (!strncmp(p, key, k) && p[k] == ' ')
			return strtoull(p + k + 1, NULL, 10);
		p = strchr(p, '\n');
		if (p)
			p++;
	}
	return 0;
}

int check_id(const char *what, const char *id, struct err *e)
{
	if (!*id)
		return err_set(e, C_INVALID_ARGUMENT, "%s is empty", what);
	if (id[0] == '.')
		return err_set(e, C_INVALID_ARGUMENT, "%s %s: must not start with '.'", what, id);
	for (const char *p = id; *p; p++) {
		char ch = *p;
		if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
		      ch == '-' || ch == '_' || ch == '.'))
			return err_set(e, C_INVALID_ARGUMENT, "%s %s: only [A-Za-z0-9._-] allowed", what, id);
	}
	return 0;
}
