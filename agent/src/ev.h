/* The event loop's plumbing: one epoll set whose registrations carry a tag
 * (kind, table index, generation), and the clocks. Every module that watches
 * a file descriptor uses this; it uses nothing of theirs. */
#ifndef AGENT_EV_H
#define AGENT_EV_H

#include <stdint.h>
#include <sys/epoll.h>

#include "err.h"

/* A generation lets a stale event for a reused slot be recognised and dropped. */
enum tag_kind {
	TAG_LISTEN = 1,
	TAG_SIGNAL,
	TAG_INOTIFY,
	TAG_CONN,
	TAG_STDOUT,
	TAG_STDERR,
	TAG_STDIN,
	TAG_DEBUG_LISTEN,
	TAG_RELAY_LISTEN,
	TAG_RELAY_VSOCK,
	TAG_RELAY_TCP,
};

static inline uint64_t tag_make(enum tag_kind k, uint32_t idx, uint32_t gen)
{
	return ((uint64_t)k << 56) | ((uint64_t)(gen & 0xffffffu) << 32) | idx;
}
static inline enum tag_kind tag_kind(uint64_t t) { return (enum tag_kind)(t >> 56); }
static inline uint32_t tag_idx(uint64_t t) { return (uint32_t)t; }
static inline uint32_t tag_gen(uint64_t t) { return (uint32_t)(t >> 32) & 0xffffffu; }

int ev_init(struct err *e);
int ev_add(int fd, uint32_t events, uint64_t tag);
int ev_mod(int fd, uint32_t events, uint64_t tag);
void ev_del(int fd);
/* epoll_wait on the set; timeout_ms -1 waits for ever. */
int ev_wait(struct epoll_event *evs, int max, int timeout_ms);
uint64_t now_ns(void);      /* CLOCK_MONOTONIC */
uint64_t wall_ns(void);     /* CLOCK_REALTIME */

#endif
