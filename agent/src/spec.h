/* Adapting an OCI runtime spec (config.json) or an exec Process for the
 * guest. Kept: cgroupsPath, resources, seccomp, capabilities, rlimits, user,
 * masked/readonly paths. Changed:
 *  - root.path becomes the guest rootfs; process.terminal follows the request;
 *  - namespaces follow CRI's NamespaceOption as containerd writes it: an
 *    ipc, uts or pid entry with a path (the sandbox's, /proc/<pid>/ns/<type>
 *    on the host) means POD and joins the pod's shared namespace in the guest
 *    (podns_dir/<type>); an entry without a path (CONTAINER) stays a new one;
 *    no entry (NODE) leaves the container in the VM's. network goes: every
 *    container shares the VM's network, which is the pod's. Other namespaces
 *    with a path (mount, cgroup) become new ones;
 *  - a spec that mounts cgroups (type cgroup or cgroup2) gets a cgroup
 *    namespace if it has none, so /sys/fs/cgroup in the container is its own
 *    cgroup (memory.max is its limit), not the VM's root;
 *  - net.* sysctls are taken out and returned to the caller, which applies
 *    them to the VM (the pod's network namespace); the others stay for crun,
 *    and one that is not namespaced is refused by name;
 *  - apparmorProfile, selinuxLabel, mountLabel and hooks are dropped;
 *  - a bind mount whose source does not exist in the guest is an error;
 *  - with bootopt_crun_fixed_layout (crun runs without address
 *    randomisation, bootopts.h), a spec without linux.personality gets
 *    {"domain":"LINUX"}: crun sets it in the container before it execs the
 *    process (crun exec too), which clears ADDR_NO_RANDOMIZE, so the
 *    workload's layout is random again. */
#ifndef AGENT_SPEC_H
#define AGENT_SPEC_H

#include <stdbool.h>
#include <stddef.h>

#include "err.h"
#include "sysctl.h"

#define SPEC_MAX_SYSCTL 16

struct spec_out {
	char *buf;
	size_t cap;
	size_t len;
	struct sysctl_kv sysctl[SPEC_MAX_SYSCTL];
	int n_sysctl;
	bool own_pidns;     /* the container's init is PID 1 of a PID namespace of its own */
};

/* podns_dir: "/proc/<pid>/ns" of the pod's namespace holder. */
int spec_adapt_config(const char *json, size_t len, const char *root_path, const char *podns_dir,
		      bool terminal, struct spec_out *out, struct err *e);
int spec_adapt_process(const char *json, size_t len, bool terminal, struct spec_out *out,
		       struct err *e);

#endif
