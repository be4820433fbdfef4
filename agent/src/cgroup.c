#include "cgroup.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/inotify.h>
#include <unistd.h>

#include "agent.h"
#include "fsutil.h"
#include "log.h"
#include "proc.h"
#include "rpc.h"

static int inotify_fd = -1;

/* Containers whose oom_kill count went up, not yet reported; coalesced by id
 * and kept after the container is removed (an OOM kill often ends it). */
#define OOM_RING 32
static char oom_ring[OOM_RING][ID_MAX];
static int oom_head, oom_len;

int cgroup_init(struct err *e)
{
	inotify_fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
	if (inotify_fd < 0)
		return err_sys(e, "inotify_init1");
	if (ev_add(inotify_fd, EPOLLIN, tag_make(TAG_INOTIFY, 0, 0)) < 0)
		return err_sys(e, "epoll add inotify");
	return 0;
}

static void oom_push(const char *id)
{
	for (int k = 0; k < oom_len; k++)
		if (!strcmp(oom_ring[(oom_head + k) % OOM_RING], id))
			return;
	if (oom_len == OOM_RING) {
		alog("OOM event for %s dropped: %d unreported", oom_ring[oom_head], OOM_RING);
		oom_head = (oom_head + 1) % OOM_RING;
		oom_len--;
	}
	snprintf(oom_ring[(oom_head + oom_len) % OOM_RING], ID_MAX, "%s", id);
	oom_len++;
}

static void oom_check(int ci)
{
	struct container *ct = &containers[ci];
	if (!ct->cgroup[0])
		return;
	char path[300], buf[512];
	struct err e;
	snprintf(path, sizeof path, "%s/memory.events", ct->cgroup);
	if (read_file(path, buf, sizeof buf, NULL, &e) < 0)
		return;
	unsigned long long n = kv_u64(buf, "oom_kill");
	if (n > ct->oom_kill) {
		alog("container %s: OOM kill (oom_kill %llu)", ct->id, n);
		ct->oom_kill = n;
		oom_push(ct->id);
	}
}

void cgroup_attach(int ci, int pid)
{
	struct container *ct = &containers[ci];
	char path[64], buf[512];
	struct err e;
	snprintf(path, sizeof path, "/proc/%d/cgroup", pid);
	if (read_file(path, buf, sizeof buf, NULL, &e) < 0) {
		alog("container %s: %s", ct->id, e.msg);
		return;
	}
	/* cgroup v2 only: the single line is "0::/path". */
	char *p = strstr(buf, "0::");
	if (!p) {
		alog("container %s: no cgroup v2 entry in %s", ct->id, path);
		return;
	}
	p += 3;
	p[strcspn(p, "\n")] = 0;
	snprintf(ct->cgroup, sizeof ct->cgroup, "/sys/fs/cgroup%s", strcmp(p, "/") ? p : "");
	char ev[300];
	snprintf(ev, sizeof ev, "%s/memory.events", ct->cgroup);
	if (read_file(ev, buf, sizeof buf, NULL, &e) == 0)
		ct->oom_kill = kv_u64(buf, "oom_kill");
	ct->oom_wd = inotify_add_watch(inotify_fd, ev, IN_MODIFY);
	if (ct->oom_wd < 0)
		alog("container %s: watch %s: %s", ct->id, ev, strerror(errno));
}

void cgroup_detach(int ci)
{
	struct container *ct = &containers[ci];
	oom_check(ci);
	if (ct->oom_wd >= 0)
		inotify_rm_watch(inotify_fd, ct->oom_wd);
	ct->oom_wd = -1;
}

void cgroup_on_inotify(void)
{
	union {
		struct inotify_event ev;
		char buf[4096];
	} u;
	for (;;) {
		ssize_t n = read(inotify_fd, u.buf, sizeof u.buf);
		if (n <= 0)
			break;
		for (char *p = u.buf; p < u.buf + n;) {
			struct inotify_event *ev = (struct inotify_event *)p;
			for (int ci = 0; ci < MAX_CONTAINERS; ci++)
				if (containers[ci].used && containers[ci].oom_wd == ev->wd)
					oom_check(ci);
			p += sizeof *ev + ev->len;
		}
	}
}

/* ---- GetOOMEvent ---- */

static int oom_poll(struct call *c, void *vresp, struct err *e)
{
	(void)c;
	(void)e;
	if (!oom_len)
		return R_PARK;
	PB(OOMEvent) *resp = vresp;
	snprintf(resp->container_id, sizeof resp->container_id, "%s", oom_ring[oom_head]);
	oom_head = (oom_head + 1) % OOM_RING;
	oom_len--;
	return R_DONE;
}

int h_get_oom_event(struct call *c, const void *vreq, void *vresp, struct err *e)
{
	(void)vreq;
	c->poll = oom_poll;
	return oom_poll(c, vresp, e);
}

/* ---- StatsContainer ---- */

static unsigned long long file_u64(const char *dir, const char *name)
{
	char path[300], buf[64];
	struct err e;
	snprintf(path, sizeof path, "%s/%s", dir, name);
	if (read_file(path, buf, sizeof buf, NULL, &e) < 0)
		return 0;
	return parse_u64(buf);
}

int h_stats_container(struct call *c, const void *vreq, void *vresp, struct err *e)
{
	const PB(ContainerRequest) *r = vreq;
	PB(StatsContainerResponse) *s = vresp;
	call_ids(c, r->container_id, NULL);
	int ci = container_get(r->container_id, e);
	if (ci < 0)
		return R_ERR;
	const char *cg = containers[ci].cgroup;
	if (!cg[0])
		return err_set(e, C_FAILED_PRECONDITION, "container %s has no cgroup yet", r->container_id);
	if (access(cg, F_OK) < 0)
		return err_sys(e, "cgroup %s", cg);
	static char buf[8192];
	char path[300];
	struct err ignored;

	snprintf(path, sizeof path, "%s/cpu.stat", cg);
	if (read_file(path, buf, sizeof buf, NULL, &ignored) == 0) {
		s->cpu_usage_usec = kv_u64(buf, "usage_usec");
		s->cpu_user_usec = kv_u64(buf, "user_usec");
		s->cpu_system_usec = kv_u64(buf, "system_usec");
		s->cpu_nr_periods = kv_u64(buf, "nr_periods");
		s->cpu_nr_throttled = kv_u64(buf, "nr_throttled");
		s->cpu_throttled_usec = kv_u64(buf, "throttled_usec");
	}
	s->memory_usage = file_u64(cg, "memory.current");
	s->memory_limit = file_u64(cg, "memory.max");
	s->memory_swap_usage = file_u64(cg, "memory.swap.current");
	snprintf(path, sizeof path, "%s/memory.stat", cg);
	if (read_file(path, buf, sizeof buf, NULL, &ignored) == 0) {
		s->memory_anon = kv_u64(buf, "anon");
		s->memory_file = kv_u64(buf, "file");
		s->memory_kernel_stack = kv_u64(buf, "kernel_stack");
		s->memory_slab = kv_u64(buf, "slab");
		s->memory_inactive_file = kv_u64(buf, "inactive_file");
		s->memory_active_file = kv_u64(buf, "active_file");
		s->memory_pgfault = kv_u64(buf, "pgfault");
		s->memory_pgmajfault = kv_u64(buf, "pgmajfault");
	}
	snprintf(path, sizeof path, "%s/memory.events", cg);
	if (read_file(path, buf, sizeof buf, NULL, &ignored) == 0) {
		s->memory_oom_events = kv_u64(buf, "oom");
		s->memory_oom_kill = kv_u64(buf, "oom_kill");
	}
	s->pids_current = file_u64(cg, "pids.current");
	s->pids_limit = file_u64(cg, "pids.max");
	return R_DONE;
}
