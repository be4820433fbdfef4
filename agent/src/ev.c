#include "ev.h"

#include <errno.h>
#include <string.h>
#include <time.h>

#include "log.h"

static int epfd = -1;

int ev_init(struct err *e)
{
	epfd = epoll_create1(EPOLL_CLOEXEC);
	if (epfd < 0)
		return err_sys(e, "epoll_create1");
	return 0;
}

int ev_add(int fd, uint32_t events, uint64_t tag)
{
	struct epoll_event ev = {.events = events, .data.u64 = tag};
	return epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
}

int ev_mod(int fd, uint32_t events, uint64_t tag)
{
	struct epoll_event ev = {.events = events, .data.u64 = tag};
	return epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev);
}

void ev_del(int fd)
{
	if (epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL) < 0 && errno != ENOENT && errno != EBADF)
		alog("epoll del fd %d: %s", fd, strerror(errno));
}

int ev_wait(struct epoll_event *evs, int max, int timeout_ms)
{
	return epoll_wait(epfd, evs, max, timeout_ms);
}

static uint64_t clock_ns(clockid_t id)
{
	struct timespec ts;
	clock_gettime(id, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t now_ns(void) { return clock_ns(CLOCK_MONOTONIC); }
uint64_t wall_ns(void) { return clock_ns(CLOCK_REALTIME); }
