/* The pod's shared namespaces (CRI NamespaceOption POD). A holder process,
 * forked by the agent, is PID 1 of a new PID namespace and the first member of
 * new IPC and UTS namespaces; containers that containerd points at the
 * sandbox's namespaces join the holder's instead (/proc/<holder>/ns/<type>).
 * For a pod whose PID or IPC mode is NODE the holder keeps the VM's, so those
 * containers join the VM's.
 * Inside the pod's PID namespace the holder is /proc/1, "pause", as pause is
 * under Kubernetes; it reaps what is reparented to it and does nothing else.
 * It runs as nobody, without capabilities, not dumpable and with no open
 * file but its stdio, so a container sharing its PID namespace cannot use it. */
#ifndef AGENT_PODNS_H
#define AGENT_PODNS_H

#include <stdbool.h>
#include <sys/types.h>

#include "err.h"
#include "sysctl.h"

#define PODNS_ARGV0 "pause"

/* Starts the holder if there is none. Returns "/proc/<holder pid>/ns". */
const char *podns_ensure(struct err *e);
/* Starts the holder with the pod's IPC and UTS sysctls set in its namespaces
 * (SetupPod); FAILED_PRECONDITION if it runs already. With node_pid / node_ipc
 * the holder stays in the VM's PID / IPC namespace (CRI NODE). */
int podns_create(const struct sysctl_kv *kv, int n, bool node_pid, bool node_ipc, struct err *e);
/* The holder's pid, 0 if none. */
pid_t podns_pid(void);
/* For the reaper: true if pid was the holder (its namespaces are gone). */
bool podns_on_exit(pid_t pid, int status);
/* main() of the holder, run when the agent is executed as PODNS_ARGV0. */
int podns_holder_main(void) __attribute__((noreturn));

#endif
