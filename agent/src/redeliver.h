/* A signal sent to a container's init before it has a handler is dropped by
 * the kernel: init is PID 1 of its PID namespace, and a default action is
 * never taken for PID 1 from inside. A stop right after a start would be
 * lost that way (issue 17). So when SignalProcess finds its target would
 * drop the signal, the agent keeps watching the target's SigCgt for a bounded
 * time, a few ms apart from the event loop, and sends the signal again once
 * a handler for it is there. */
#ifndef AGENT_REDELIVER_H
#define AGENT_REDELIVER_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#define REDELIVER_SLOTS 16
#define REDELIVER_FOR_NS (10ull * 1000000000)  /* give up after this long */
#define REDELIVER_EVERY_NS (5ull * 1000000)    /* between two looks at SigCgt */

/* Watches process slot pi (generation gen) and re-sends sig once it is caught. */
void redeliver_add(int pi, uint32_t gen, int sig);
/* Runs the watches; returns when the next one is due (monotonic ns) or 0. */
uint64_t redeliver_poll(void);

#endif
