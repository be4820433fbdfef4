/* Port relays: a vsock stream from the shim per forwarded TCP connection,
 * bridged to a TCP connection to the guest's loopback (the protocol is in
 * proto/agent.proto, RelayOpenRequest). Fixed table, bounded buffers, driven
 * by the event loop; a relay never blocks the loop. */
#ifndef AGENT_RELAY_H
#define AGENT_RELAY_H

#include <stdint.h>

#include "err.h"

#define RELAY_PORT 1025
#define MAX_RELAYS 64
#define RELAY_BUF 32768   /* per direction */
#define RELAY_FRAME 16384 /* largest DATA payload */

int relay_listen(struct err *e);
void relay_on_listen(int fd);
void relay_on_event(int kind, uint32_t idx, uint32_t gen, uint32_t events);
/* Ends relays past their open deadline; returns the next deadline (monotonic ns) or 0. */
uint64_t relay_housekeeping(void);

#endif
