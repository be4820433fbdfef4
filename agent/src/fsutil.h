/* Small file-system helpers; each reports failures as an err value. */
#ifndef AGENT_FSUTIL_H
#define AGENT_FSUTIL_H

#include <stddef.h>
#include <sys/types.h>

#include "err.h"

int mkdir_p(const char *path, mode_t mode, struct err *e);
/* Writes all of data to fd (path names it in errors). */
int write_all(int fd, const void *data, size_t len, const char *path, struct err *e);
int write_file(const char *path, const void *data, size_t len, mode_t mode, struct err *e);
/* Reads at most cap-1 bytes and NUL-terminates; *len may be NULL. */
int read_file(const char *path, char *buf, size_t cap, size_t *len, struct err *e);
/* Removes a tree without following symlinks or crossing into other mounts. */
int rm_rf(const char *path, struct err *e);
/* Parses the first unsigned integer in s ("max" gives 0). */
unsigned long long parse_u64(const char *s);
/* Value of "key <n>" lines (cpu.stat, memory.stat, memory.events); 0 if absent. */
unsigned long long kv_u64(const char *text, const char *key);
/* Rejects ids that cannot be used as a single path component. */
int check_id(const char *what, const char *id, struct err *e);

#endif
