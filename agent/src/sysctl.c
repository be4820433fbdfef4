#include "sysctl.h"

#include <stdio.h>
#include <string.h>

#include "fsutil.h"

/* The IPC-namespaced sysctls runc accepts (with fs.mqueue.*): the kernel has a
 * few more (kernel.*_next_id), which runc refuses too. */
static const char *const ipc_keys[] = {
	"kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem",
	"kernel.shmall", "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced",
};

enum sysctl_ns sysctl_ns_of(const char *key)
{
	for (size_t i = 0; i < sizeof ipc_keys / sizeof ipc_keys[0]; i++)
		if (!strcmp(key, ipc_keys[i]))
			return SYSCTL_IPC;
	if (!strncmp(key, "fs.mqueue.", 10))
		return SYSCTL_IPC;
	if (!strcmp(key, "kernel.hostname") || !strcmp(key, "kernel.domainname"))
		return SYSCTL_UTS;
	if (!strncmp(key, "net.", 4))
		return SYSCTL_NET;
	return SYSCTL_NOT_NAMESPACED;
}

int sysctl_refuse(const char *key, struct err *e)
{
	return err_set(e, C_INVALID_ARGUMENT,
		       "sysctl %s is not namespaced: only kernel.shm*, kernel.msg*, kernel.sem, fs.mqueue.* "
		       "(IPC), kernel.hostname, kernel.domainname (UTS) and net.* can be set",
		       key);
}

int sysctl_path(const char *key, char *buf, size_t cap, struct err *e)
{
	size_t n = strlen(key);
	if (!n || strchr(key, '/') || strstr(key, "..") || key[0] == '.' || key[n - 1] == '.')
		return err_set(e, C_INVALID_ARGUMENT, "sysctl %s: bad name", key);
	int w = snprintf(buf, cap, "/proc/sys/%s", key);
	if (w < 0 || (size_t)w >= cap)
		return err_set(e, C_INVALID_ARGUMENT, "sysctl %s: name too long", key);
	for (char *p = buf + 10; *p; p++)
		if (*p == '.')
			*p = '/';
	return 0;
}

int sysctl_write(const struct sysctl_kv *kv, struct err *e)
{
	char path[160];
	if (sysctl_path(kv->key, path, sizeof path, e) < 0)
		return -1;
	struct err w;
	if (write_file(path, kv->val, strlen(kv->val), 0644, &w) < 0)
		return err_set(e, C_INVALID_ARGUMENT, "sysctl %s=%s: %s", kv->key, kv->val, w.msg);
	return 0;
}
