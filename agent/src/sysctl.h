/* Which namespace a sysctl belongs to, and where it lives under /proc/sys.
 * Only namespaced sysctls can be set for a pod or a container: the rest are
 * the VM's kernel's, and refused by name. */
#ifndef AGENT_SYSCTL_H
#define AGENT_SYSCTL_H

#include <stddef.h>

#include "err.h"

enum sysctl_ns { SYSCTL_NOT_NAMESPACED = 0, SYSCTL_IPC, SYSCTL_UTS, SYSCTL_NET };

struct sysctl_kv {
	char key[128];
	char val[256];
};

enum sysctl_ns sysctl_ns_of(const char *key);
/* The INVALID_ARGUMENT error for a key that is not namespaced. */
int sysctl_refuse(const char *key, struct err *e);
/* /proc/sys/<key, dots as slashes>; names with '/', "..", or empty parts are refused. */
int sysctl_path(const char *key, char *buf, size_t cap, struct err *e);
/* Writes the value in the caller's namespaces; INVALID_ARGUMENT naming the key. */
int sysctl_write(const struct sysctl_kv *kv, struct err *e);

#endif
