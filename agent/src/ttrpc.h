/* ttrpc over stream sockets: the vsock listener, the connection table, frame
 * parsing, the Request/Response envelope (nanopb) and per-connection
 * back-pressure. Requests go up through the dispatch callback (rpc.c). */
#ifndef AGENT_TTRPC_H
#define AGENT_TTRPC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "pb.h"

/* What the connection layer hands up: a decoded request, and a connection that
 * went away (calls waiting on it are dropped). Set once, before listening. */
typedef void (*ttrpc_dispatch_fn)(uint16_t conn, uint32_t gen, uint32_t stream, const char *method,
				  int64_t timeout_nano, const uint8_t *payload, size_t len);
typedef void (*ttrpc_closed_fn)(uint16_t conn, uint32_t gen);
void ttrpc_init(ttrpc_dispatch_fn dispatch, ttrpc_closed_fn closed);

int ttrpc_listen_vsock(unsigned port, struct err *e);
int ttrpc_listen_unix(const char *path, struct err *e);   /* debugging on a host */
void ttrpc_on_listen(int fd);
void ttrpc_on_conn(uint32_t idx, uint32_t gen, uint32_t events);
/* Closes connections that failed; resumes reading on drained ones. */
void ttrpc_housekeeping(void);

bool ttrpc_alive(uint16_t conn, uint32_t gen);
/* True when the connection can take one more response of any size. */
bool ttrpc_can_reply(uint16_t conn, uint32_t gen);
/* Queues a Response frame: status code (0 = OK, then msg is ignored) and the
 * payload message `src` of type `fields` (NULL: none), encoded in place.
 * Returns -1 when the connection is gone or full, -2 when the message does not
 * encode (nothing was queued). */
int ttrpc_reply(uint16_t conn, uint32_t gen, uint32_t stream, int code,
		const char *msg, const pb_msgdesc_t *fields, const void *src);
/* Writes out pending responses of one connection, blocking up to ms. */
void ttrpc_flush_blocking(uint16_t conn, uint32_t gen, int ms);

#endif
