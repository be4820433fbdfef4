/* Guest-wide RPCs: health, identity, time, hostname/DNS, file copy, shutdown.
 * The network's are in h_net.c. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "fsutil.h"
#include "log.h"
#include "pid1.h"
#include "podns.h"
#include "rpc.h"
#include "sysctl.h"

int h_health(struct call *c, const void *req, void *vresp, struct err *e)
{
	(void)c;
	(void)req;
	(void)e;
	((PB(HealthResponse) *)vresp)->status = PB(HealthResponse_ServingStatus_SERVING);
	return R_DONE;
}

static unsigned count_cpus(const char *list)
{
	/* "0-3,5,7-8" */
	unsigned n = 0;
	for (const char *p = list; *p && *p != '\n';) {
		char *end;
		unsigned long a = strtoul(p, &end, 10), b = a;
		if (end == p)
			break;
		if (*end == '-')
			b = strtoul(end + 1, &end, 10);
		if (b >= a)
			n += (unsigned)(b - a + 1);
		p = *end == ',' ? end + 1 : end;
	}
	return n;
}

int h_guest_info(struct call *c, const void *req, void *vresp, struct err *e)
{
	(void)c;
	(void)req;
	PB(GuestInfoResponse) *r = vresp;
	static char buf[4096];
	snprintf(r->agent_version, sizeof r->agent_version, "%s", AGENT_VERSION);
	struct utsname u;
	if (uname(&u) < 0)
		return err_sys(e, "uname");
	strfmt(r->kernel_release, sizeof r->kernel_release, "%s", u.release);
	if (read_file("/proc/sys/kernel/random/boot_id", buf, sizeof buf, NULL, e) < 0)
		return R_ERR;
	buf[strcspn(buf, "\n")] = 0;
	strfmt(r->boot_id, sizeof r->boot_id, "%s", buf);
	if (read_file("/sys/devices/system/cpu/online", buf, sizeof buf, NULL, e) < 0)
		return R_ERR;
	r->online_cpus = count_cpus(buf);
	if (read_file("/proc/meminfo", buf, sizeof buf, NULL, e) < 0)
		return R_ERR;
	char *m = strstr(buf, "MemTotal:");
	if (m)
		r->memory_total_kib = strtoull(m + 9, NULL, 10);
	struct timespec ts;
	if (clock_gettime(CLOCK_BOOTTIME, &ts) < 0)
		return err_sys(e, "clock_gettime");
	r->uptime_ms = (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
	return R_DONE;
}

int h_set_time(struct call *c, const void *vreq, void *vresp, struct err *e)
{
	const PB(SetTimeRequest) *r = vreq;
	(void)vresp;
	snprintf(c->ids, sizeof c->ids, " unix=%lld", (long long)r->unix_sec);
	if (r->nsec < 0 || r->nsec >= 1000000000 || r->unix_sec < 0)
		return err_set(e, C_INVALID_ARGUMENT, "time %lld.%09d out of range", (long long)r->unix_sec, r->nsec);
	struct timespec ts = {.tv_sec = (time_t)r->unix_sec, .tv_nsec = r->nsec};
	if (clock_settime(CLOCK_REALTIME, &ts) < 0)
		return err_sys(e, "clock_settime");
	return R_DONE;
}

int h_setup_pod(struct call *c, const void *vreq, void *vresp, struct err *e)
{
	const PB(SetupPodRequest) *r = vreq;
	(void)vresp;
	snprintf(c->ids, sizeof c->ids, " hostname=%s sysctls=%u%s%s", r->hostname, (unsigned)r->sysctls_count,
		 r->node_pid ? " node-pid" : "", r->node_ipc ? " node-ipc" : "");
	/* Every sysctl is checked before anything is changed. */
	static struct sysctl_kv pod_kv[sizeof r->sysctls / sizeof r->sysctls[0]], net_kv[sizeof pod_kv / sizeof pod_kv[0]];
	int n_pod = 0, n_net = 0;
	for (pb_size_t i = 0; i < r->sysctls_count; i++) {
		const char *key = r->sysctls[i].key;
		enum sysctl_ns ns = sysctl_ns_of(key);
		char path[160];
		if (ns == SYSCTL_NOT_NAMESPACED)
			return sysctl_refuse(key, e);
		if (sysctl_path(key, path, sizeof path, e) < 0)
			return R_ERR;
		struct sysctl_kv *kv = ns == SYSCTL_NET ? &net_kv[n_net++] : &pod_kv[n_pod++];
		strfmt(kv->key, sizeof kv->key, "%s", key);
		strfmt(kv->val, sizeof kv->val, "%s", r->sysctls[i].value);
	}
	if (r->hostname[0] && sethostname(r->hostname, strlen(r->hostname)) < 0)
		return err_sys(e, "sethostname %s", r->hostname);
	/* After sethostname: the pod's UTS namespace starts as a copy of the VM's. */
	if (podns_create(pod_kv, n_pod, r->node_pid, r->node_ipc, e) < 0)
		return R_ERR;
	for (int i = 0; i < n_net; i++) {
		if (sysctl_write(&net_kv[i], e) < 0)
			return R_ERR;
		alog("sysctl %s=%s applied to the VM (the pod's network namespace)", net_kv[i].key, net_kv[i].val);
	}
	/* /etc is read-only: the files live under /run/cloudhv for the shim to
	 * bind into containers. */
	static char buf[8192];
	size_t n = 0;
	for (pb_size_t i = 0; i < r->dns_servers_count; i++)
		n += (size_t)snprintf(buf + n, sizeof buf - n, "nameserver %s\n", r->dns_servers[i]);
	if (r->dns_searches_count) {
		n += (size_t)snprintf(buf + n, sizeof buf - n, "search");
		for (pb_size_t i = 0; i < r->dns_searches_count; i++)
			n += (size_t)snprintf(buf + n, sizeof buf - n, " %s", r->dns_searches[i]);
		n += (size_t)snprintf(buf + n, sizeof buf - n, "\n");
	}
	if (r->dns_options_count) {
		n += (size_t)snprintf(buf + n, sizeof buf - n, "options");
		for (pb_size_t i = 0; i < r->dns_options_count; i++)
			n += (size_t)snprintf(buf + n, sizeof buf - n, " %s", r->dns_options[i]);
		n += (size_t)snprintf(buf + n, sizeof buf - n, "\n");
	}
	if (mkdir_p(RUN_DIR, 0755, e) < 0 || write_file(RUN_DIR "/resolv.conf", buf, n, 0644, e) < 0)
		return R_ERR;
	n = (size_t)snprintf(buf, sizeof buf, "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
	if (r->hostname[0])
		n += (size_t)snprintf(buf + n, sizeof buf - n, "127.0.1.1\t%s\n", r->hostname);
	if (write_file(RUN_DIR "/hosts", buf, n, 0644, e) < 0)
		return R_ERR;
	if (r->hostname[0] && write_file(RUN_DIR "/hostname", r->hostname, strlen(r->hostname), 0644, e) < 0)
		return R_ERR;
	alog("pod files: %s/resolv.conf %s/hosts %s/hostname", RUN_DIR, RUN_DIR, RUN_DIR);
	return R_DONE;
}

static int check_path(const char *path, struct err *e)
{
	if (path[0] != '/')
		return err_set(e, C_INVALID_ARGUMENT, "path %s: must be absolute", path);
	for (const char *p = path; (p = strstr(p, "..")); p += 2)
		if ((p == path || p[-1] == '/') && (p[2] == '/' || p[2] == 0))
			return err_set(e, C_INVALID_ARGUMENT, "path %s: must not contain '..'", path);
	return 0;
}

/* An existing regular file keeps its inode: it may be bind-mounted into a
 * running container (CRI refreshes /etc/hosts and resolv.conf), and a bind
 * mount would keep showing the old inode if we renamed a new one over it. */
static int rewrite_in_place(const char *path, const void *data, size_t len, mode_t mode, uid_t uid,
			    gid_t gid, struct err *e)
{
	/* O_NOFOLLOW and the fstat: the path was a regular file when we looked;
	 * if something else took its place since, do not write through it. */
	int fd = open(path, O_WRONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0)
		return err_sys(e, "open %s", path);
	struct stat st;
	int rc;
	if (fstat(fd, &st) < 0)
		rc = err_sys(e, "stat %s", path);
	else if (!S_ISREG(st.st_mode))
		rc = err_set(e, C_FAILED_PRECONDITION, "%s changed while being copied", path);
	else if (ftruncate(fd, 0) < 0)
		rc = err_sys(e, "truncate %s", path);
	else if (write_all(fd, data, len, path, e) < 0)
		rc = -1;
	/* chown first: it clears set-id bits that the mode may ask for. */
	else if (fchown(fd, uid, gid) < 0)
		rc = err_sys(e, "chown %s", path);
	else if (fchmod(fd, mode) < 0)
		rc = err_sys(e, "chmod %s", path);
	else
		rc = 0;
	if (close(fd) < 0 && rc == 0)
		rc = err_sys(e, "close %s", path);
	return rc;
}

int h_copy_file(struct call *c, const void *vreq, void *vresp, struct err *e)
{
	const PB(CopyFileRequest) *r = vreq;
	(void)vresp;
	strfmt(c->ids, sizeof c->ids, " path=%s", r->path);
	if (check_path(r->path, e) < 0)
		return R_ERR;
	char parent[256];
	snprintf(parent, sizeof parent, "%s", r->path);
	char *slash = strrchr(parent, '/');
	if (slash == parent)
		slash[1] = 0;
	else
		*slash = 0;
	if (mkdir_p(parent, 0755, e) < 0)
		return R_ERR;
	mode_t mode = r->mode & 07777;
	uid_t uid = r->uid;
	gid_t gid = r->gid;
	if (r->is_dir) {
		if (mkdir(r->path, mode ? mode : 0755) < 0 && errno != EEXIST)
			return err_sys(e, "mkdir %s", r->path);
		struct stat st;
		if (stat(r->path, &st) < 0)
			return err_sys(e, "stat %s", r->path);
		if (!S_ISDIR(st.st_mode))
			return err_set(e, C_ALREADY_EXISTS, "%s exists and is not a directory", r->path);
		if (chmod(r->path, mode ? mode : 0755) < 0)
			return err_sys(e, "chmod %s", r->path);
		if (lchown(r->path, uid, gid) < 0)
			return err_sys(e, "chown %s", r->path);
		return R_DONE;
	}
	struct stat cur;
	if (!r->is_symlink && lstat(r->path, &cur) == 0 && S_ISREG(cur.st_mode)) {
		if (rewrite_in_place(r->path, r->data.bytes, r->data.size, mode ? mode : 0644, uid, gid, e) < 0)
			return R_ERR;
		return R_DONE;
	}
	/* New files, symlinks (a swap such as kubelet's ..data must be atomic)
	 * and replacements of other file types: made aside, renamed over. */
	char tmp[280];
	snprintf(tmp, sizeof tmp, "%s.cloudhv-tmp", r->path);
	unlink(tmp);
	if (r->is_symlink) {
		char target[4096];
		if (r->data.size == 0 || r->data.size >= sizeof target || memchr(r->data.bytes, 0, r->data.size))
			return err_set(e, C_INVALID_ARGUMENT, "symlink %s: bad target", r->path);
		memcpy(target, r->data.bytes, r->data.size);
		target[r->data.size] = 0;
		if (symlink(target, tmp) < 0)
			return err_sys(e, "symlink %s", tmp);
	} else {
		if (write_file(tmp, r->data.bytes, r->data.size, 0600, e) < 0)
			goto fail;
	}
	if (lchown(tmp, uid, gid) < 0) {
		err_sys(e, "chown %s", tmp);
		goto fail;
	}
	/* After chown, which clears set-id bits the mode may ask for. */
	if (!r->is_symlink && chmod(tmp, mode ? mode : 0644) < 0) {
		err_sys(e, "chmod %s", tmp);
		goto fail;
	}
	if (rename(tmp, r->path) < 0) {
		err_sys(e, "rename %s to %s", tmp, r->path);
		goto fail;
	}
	return R_DONE;
fail:
	unlink(tmp);
	return R_ERR;
}

int h_shutdown(struct call *c, const void *req, void *resp, struct err *e)
{
	(void)req;
	(void)resp;
	(void)e;
	request_shutdown(c->conn, c->conn_gen);
	return R_DONE;
}
