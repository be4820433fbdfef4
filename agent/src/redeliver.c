#include "redeliver.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "ev.h"
#include "log.h"
#include "proc.h"
#include "sigstate.h"

static struct {
	bool used;
	int pi;
	uint32_t gen;
	int sig;
	uint64_t until, next;
} watch[REDELIVER_SLOTS];

void redeliver_add(int pi, uint32_t gen, int sig)
{
	uint64_t now = now_ns();
	for (int i = 0; i < REDELIVER_SLOTS; i++) {
		if (watch[i].used && !(watch[i].pi == pi && watch[i].gen == gen && watch[i].sig == sig))
			continue;
		watch[i].used = true;
		watch[i].pi = pi;
		watch[i].gen = gen;
		watch[i].sig = sig;
		watch[i].until = now + REDELIVER_FOR_NS;
		watch[i].next = now + REDELIVER_EVERY_NS;
		return;
	}
	alog("signal %d to pid %d was dropped (no handler yet); all %d re-delivery slots in use", sig,
	     procs[pi].pid, REDELIVER_SLOTS);
}

uint64_t redeliver_poll(void)
{
	uint64_t now = now_ns(), wake = 0;
	for (int i = 0; i < REDELIVER_SLOTS; i++) {
		if (!watch[i].used)
			continue;
		struct proc *p = &procs[watch[i].pi];
		if (!p->used || p->gen != watch[i].gen || p->exited || p->pid <= 0) {
			watch[i].used = false;
			continue;
		}
		if (now < watch[i].next) {
			if (!wake || watch[i].next < wake)
				wake = watch[i].next;
			continue;
		}
		struct sigstate st;
		if (sigstate_read(p->pid, watch[i].sig, &st) < 0) {
			watch[i].used = false; /* gone; the reaper reports it */
			continue;
		}
		if (st.caught || st.ignored) {
			watch[i].used = false;
			if (st.caught && kill(p->pid, watch[i].sig) < 0)
				alog("re-deliver signal %d to pid %d: %s", watch[i].sig, p->pid, strerror(errno));
			else if (st.caught)
				alog("signal %d re-delivered to pid %d (%s): its handler is there now", watch[i].sig,
				     p->pid, containers[p->cont].id);
			continue;
		}
		if (now >= watch[i].until) {
			alog("signal %d to pid %d (%s): no handler after %llu s, not re-delivered", watch[i].sig,
			     p->pid, containers[p->cont].id, REDELIVER_FOR_NS / 1000000000);
			watch[i].used = false;
			continue;
		}
		watch[i].next = now + REDELIVER_EVERY_NS;
		if (!wake || watch[i].next < wake)
			wake = watch[i].next;
	}
	return wake;
}
