/* Keeping containers away from vsock, the agent's transport: every container's
 * seccomp filter makes socket(AF_VSOCK, ...) fail with EPERM, unless the spec's
 * annotation io.cloudhv.container.allow-vsock is "true". Exec'd processes run
 * under the same filter (crun exec applies the container's). */
#ifndef AGENT_SECCOMP_H
#define AGENT_SECCOMP_H

#include "err.h"
#include "json.h"

#define ALLOW_VSOCK_ANNOTATION "io.cloudhv.container.allow-vsock"

/* Edits the spec's linux.seccomp in d (root is the spec object, linux_ its
 * "linux" member or -1). A spec without seccomp gets a profile that allows
 * everything else. */
int seccomp_deny_vsock(struct jdoc *d, int root, int linux_, struct err *e);

#endif
