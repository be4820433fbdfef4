/* Adapting an OCI runtime spec (config.json) or an exec Process for the
 * guest. Kept: cgroupsPath, resources, seccomp, capabilities, rlimits, user,
 * masked/readonly paths. Changed:
 *  - root.path becomes the guest rootfs; process.terminal follows the request;
 *  - namespaces lose host paths. network, and ipc/uts that pointed at the
 *    pod's (host) namespaces, are dropped: the VM is the pod, so containers
 *    share the VM's network, IPC and UTS namespaces. Other namespaces with a
 *    path become new ones. "hostname" goes with a dropped UTS namespace;
 *  - a spec that mounts cgroups (type cgroup or cgroup2) gets a cgroup
 *    namespace if it has none, so /sys/fs/cgroup in the container is its own
 *    cgroup (memory.max is its limit), not the VM's root;
 *  - net.* sysctls are taken out and returned to the caller, which applies
 *    them to the VM (the pod's network namespace);
 *  - apparmorProfile, selinuxLabel, mountLabel and hooks are dropped;
 *  - a bind mount whose source does not exist in the guest is an error. */
#ifndef AGENT_SPEC_H
#define AGENT_SPEC_H

#include <stdbool.h>
#include <stddef.h>

#include "err.h"

#define SPEC_MAX_SYSCTL 16

struct sysctl_kv {
	char key[128];
	char val[256];
};

struct spec_out {
	char *buf;
	size_t cap;
	size_t len;
	struct sysctl_kv sysctl[SPEC_MAX_SYSCTL];
	int n_sysctl;
};

int spec_adapt_config(const char *json, size_t len, const char *root_path, bool terminal,
		      struct spec_out *out, struct err *e);
int spec_adapt_process(const char *json, size_t len, bool terminal, struct spec_out *out,
		       struct err *e);

#endif
