#include "spec.h"

#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "bootopts.h"
#include "json.h"
#include "seccomp.h"

#define SPEC_MAX_NODES 16384

static struct jnode pool[SPEC_MAX_NODES];
static char keybuf[16384];
static struct jdoc doc = {pool, 0, SPEC_MAX_NODES, keybuf, sizeof keybuf, 0};
static char root_quoted[6 * 256 + 8];

static void drop_lsm(struct jdoc *d, int process)
{
	json_del(d, json_get(d, process, "apparmorProfile"));
	json_del(d, json_get(d, process, "selinuxLabel"));
}

static char pod_paths[3][48];

static int adapt_namespaces(struct jdoc *d, int linux_, const char *podns_dir, struct spec_out *out,
			    struct err *e)
{
	static const char *const pod_types[] = {"ipc", "uts", "pid"};
	int nss = json_get(d, linux_, "namespaces");
	if (nss < 0)
		return 0;
	if (d->n[nss].type != J_ARR)
		return err_set(e, C_INVALID_ARGUMENT, "spec: linux.namespaces is not an array");
	JSON_EACH(d, nss, i)
	{
		char type[32];
		if (json_str(d, json_get(d, i, "type"), type, sizeof type) < 0)
			return err_set(e, C_INVALID_ARGUMENT, "spec: a namespace has no type");
		if (!strcmp(type, "network")) {
			json_del(d, i);
			continue;
		}
		int path = json_get(d, i, "path");
		if (!strcmp(type, "pid") && path < 0)
			out->own_pidns = true;
		if (path < 0)
			continue;
		/* A path names a host process's namespace, meaningless in the guest:
		 * for the pod's shared kinds it becomes the holder's, for the others
		 * the container gets a new one. */
		int k;
		for (k = 0; k < 3 && strcmp(type, pod_types[k]); k++)
			;
		if (k == 3) {
			json_del(d, path);
			continue;
		}
		char p[40];
		snprintf(p, sizeof p, "%s/%s", podns_dir ? podns_dir : "", type);
		if (!podns_dir || !json_quote(p, pod_paths[k], sizeof pod_paths[k]))
			return err_set(e, C_FAILED_PRECONDITION, "spec: %s namespace of the pod: none to join", type);
		if (json_set(d, i, "path", pod_paths[k], e) < 0)
			return -1;
	}
	return 0;
}

/* Without a cgroup namespace crun mounts the VM's whole cgroup2 hierarchy on
 * the container's /sys/fs/cgroup: the container sees the VM's root cgroup and
 * no memory.max of its own. containerd's CRI asks for a cgroup namespace only
 * when the host is on cgroup v2 (and never for privileged containers); the
 * guest always is, and the VM is the pod, so a container that mounts cgroups
 * gets its own namespace: its cgroup is the root of what it sees. */
static int ensure_cgroup_namespace(struct jdoc *d, int root, int linux_, struct err *e)
{
	int nss = json_get(d, linux_, "namespaces");
	int mounts = json_get(d, root, "mounts");
	if (nss < 0 || d->n[nss].type != J_ARR || mounts < 0 || d->n[mounts].type != J_ARR)
		return 0;
	JSON_EACH(d, nss, i)
	{
		if (json_str_eq(d, json_get(d, i, "type"), "cgroup"))
			return 0;
	}
	JSON_EACH(d, mounts, m)
	{
		int type = json_get(d, m, "type");
		if (json_str_eq(d, type, "cgroup") || json_str_eq(d, type, "cgroup2"))
			return json_append(d, nss, "{\"type\":\"cgroup\"}", e);
	}
	return 0;
}

static int take_net_sysctls(struct jdoc *d, int linux_, struct spec_out *out, struct err *e)
{
	int sc = json_get(d, linux_, "sysctl");
	if (sc < 0 || d->n[sc].type != J_OBJ)
		return 0;
	JSON_EACH(d, sc, i)
	{
		char key[sizeof out->sysctl[0].key];
		if (d->n[i].klen >= sizeof key)
			return err_set(e, C_INVALID_ARGUMENT, "spec: sysctl %.*s...: name too long", 64, d->n[i].key);
		memcpy(key, d->n[i].key, d->n[i].klen);
		key[d->n[i].klen] = 0;
		enum sysctl_ns ns = sysctl_ns_of(key);
		if (ns == SYSCTL_NOT_NAMESPACED)
			return sysctl_refuse(key, e);
		if (ns != SYSCTL_NET)
			continue;
		if (out->n_sysctl == SPEC_MAX_SYSCTL)
			return err_set(e, C_INVALID_ARGUMENT, "spec: more than %d net.* sysctls", SPEC_MAX_SYSCTL);
		struct sysctl_kv *kv = &out->sysctl[out->n_sysctl];
		if (json_str(d, i, kv->val, sizeof kv->val) < 0)
			return err_set(e, C_INVALID_ARGUMENT, "spec: sysctl %s: value is not a short string", key);
		memcpy(kv->key, key, sizeof key);
		out->n_sysctl++;
		json_del(d, i);
	}
	return 0;
}

static bool is_bind(struct jdoc *d, int m)
{
	if (json_str_eq(d, json_get(d, m, "type"), "bind"))
		return true;
	int opts = json_get(d, m, "options");
	if (opts < 0 || d->n[opts].type != J_ARR)
		return false;
	JSON_EACH(d, opts, o)
	{
		if (json_str_eq(d, o, "bind") || json_str_eq(d, o, "rbind"))
			return true;
	}
	return false;
}

static int check_mounts(struct jdoc *d, int root, struct err *e)
{
	int mounts = json_get(d, root, "mounts");
	if (mounts < 0)
		return 0;
	if (d->n[mounts].type != J_ARR)
		return err_set(e, C_INVALID_ARGUMENT, "spec: mounts is not an array");
	JSON_EACH(d, mounts, m)
	{
		if (!is_bind(d, m))
			continue;
		char dst[512], src[512];
		if (json_str(d, json_get(d, m, "destination"), dst, sizeof dst) < 0)
			return err_set(e, C_INVALID_ARGUMENT, "spec: a mount has no destination");
		if (json_str(d, json_get(d, m, "source"), src, sizeof src) < 0)
			return err_set(e, C_INVALID_ARGUMENT, "spec: bind mount %s has no source", dst);
		struct stat st;
		if (src[0] == '/' && stat(src, &st) < 0)
			return err_set(e, C_INVALID_ARGUMENT, "spec: bind mount %s: source %s does not exist in the guest",
				       dst, src);
	}
	return 0;
}

int spec_adapt_config(const char *json, size_t len, const char *root_path, const char *podns_dir,
		      bool terminal, struct spec_out *out, struct err *e)
{
	struct jdoc *d = &doc;
	out->n_sysctl = 0;
	out->own_pidns = false;
	if (json_parse(d, json, len, e) < 0)
		return -1;
	if (d->n[0].type != J_OBJ)
		return err_set(e, C_INVALID_ARGUMENT, "spec: not a JSON object");
	int root = 0;

	if (!json_quote(root_path, root_quoted, sizeof root_quoted))
		return err_set(e, C_INVALID_ARGUMENT, "spec: root path too long");
	int r = json_get(d, root, "root");
	if (r >= 0 && d->n[r].type == J_OBJ) {
		if (json_set(d, r, "path", root_quoted, e) < 0)
			return -1;
	} else {
		static char raw[sizeof root_quoted + 16];
		strcpy(raw, "{\"path\":");
		strcat(raw, root_quoted);
		strcat(raw, "}");
		if (json_set(d, root, "root", raw, e) < 0)
			return -1;
	}

	int process = json_get(d, root, "process");
	if (process < 0 || d->n[process].type != J_OBJ)
		return err_set(e, C_INVALID_ARGUMENT, "spec: no process object");
	drop_lsm(d, process);
	if (json_set(d, process, "terminal", terminal ? "true" : "false", e) < 0)
		return -1;

	json_del(d, json_get(d, root, "hooks"));

	int linux_ = json_get(d, root, "linux");
	if (linux_ >= 0 && d->n[linux_].type == J_OBJ) {
		json_del(d, json_get(d, linux_, "mountLabel"));
		if (bootopt_crun_fixed_layout && json_get(d, linux_, "personality") < 0 &&
		    json_set(d, linux_, "personality", "{\"domain\":\"LINUX\"}", e) < 0)
			return -1;
		if (adapt_namespaces(d, linux_, podns_dir, out, e) < 0 || take_net_sysctls(d, linux_, out, e) < 0 ||
		    ensure_cgroup_namespace(d, root, linux_, e) < 0)
			return -1;
	}
	if (check_mounts(d, root, e) < 0 || seccomp_deny_vsock(d, root, linux_, e) < 0)
		return -1;
	return json_write(d, out->buf, out->cap, &out->len, e);
}

int spec_adapt_process(const char *json, size_t len, bool terminal, struct spec_out *out,
		       struct err *e)
{
	struct jdoc *d = &doc;
	out->n_sysctl = 0;
	if (json_parse(d, json, len, e) < 0)
		return -1;
	if (d->n[0].type != J_OBJ)
		return err_set(e, C_INVALID_ARGUMENT, "process: not a JSON object");
	drop_lsm(d, 0);
	if (json_set(d, 0, "terminal", terminal ? "true" : "false", e) < 0)
		return -1;
	return json_write(d, out->buf, out->cap, &out->len, e);
}
