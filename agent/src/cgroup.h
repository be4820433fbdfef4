/* The container's cgroup v2 files: stats, process list, OOM kill events. */
#ifndef AGENT_CGROUP_H
#define AGENT_CGROUP_H

#include "err.h"

int cgroup_init(struct err *e);
/* Reads /proc/<pid>/cgroup and starts watching memory.events. */
void cgroup_attach(int ci, int pid);
/* Last look at memory.events before the container goes, then unwatch. */
void cgroup_detach(int ci);
void cgroup_on_inotify(void);

#endif
