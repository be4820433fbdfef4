/* RPC dispatch: the method table, one in-flight call per request, and the
 * pool of parked calls (long polls and crun jobs) that are re-polled on every
 * turn of the event loop until they complete or their deadline passes. */
#ifndef AGENT_RPC_H
#define AGENT_RPC_H

#include <stdbool.h>
#include <stdint.h>

#include "agent.h"
#include "err.h"
#include "netlink.h"

#define PB(x) cloudhv_agent_v1_##x

enum { R_ERR = -1, R_DONE = 0, R_PARK = 1 };

struct method;

#define PARK_STDIN_MAX 4096 /* a parked WriteStdin keeps at most this much */

struct call {
	bool used;
	uint16_t conn;
	uint32_t conn_gen;
	uint32_t stream;
	const struct method *m;
	uint64_t start_ns;
	uint64_t deadline_ns; /* 0: none */
	uint64_t wake_ns;     /* poll again at this time even without events; 0: none */
	char ids[168];        /* for the log line */
	bool loud;            /* log this call even if its method is quiet */
	/* Set by a handler that returns R_PARK. poll returns R_PARK, R_DONE or
	 * R_ERR; release runs once when the call leaves the pool for any reason. */
	int (*poll)(struct call *c, void *resp, struct err *e);
	void (*release)(struct call *c);
	union {
		struct {
			int idx;
			uint32_t gen;
			uint32_t max_bytes;
			uint32_t len;
			uint8_t data[PARK_STDIN_MAX];
		} proc;
		struct {
			int idx;
			uint32_t gen;
		} job;
		struct {
			char serial[24];
			char fstype[16];
			char target[256];
			char data[520];
			unsigned long flags;
			uint64_t until_ns;
		} disk;
		struct {
			uint8_t mac[6];
			char mac_text[18];
			char name[16];
			uint32_t mtu;
			int naddrs;
			struct nl_addr addrs[16];
			uint64_t until_ns;
		} net;
	} u;
};

typedef int (*handler_fn)(struct call *c, const void *req, void *resp, struct err *e);

struct method {
	const char *name;
	const pb_msgdesc_t *req_fields;
	const pb_msgdesc_t *resp_fields;
	size_t resp_size;
	handler_fn fn;
	bool may_park;
	uint8_t quiet; /* Q_* : which outcomes are not logged */
};

/* Stream data calls come by the hundred per second: their log lines would
 * cost more than the calls (the console is a serial port). */
#define Q_OK 1       /* success is not logged unless the call set `loud` */
#define Q_DEADLINE 2 /* a long poll ending without news is not logged */

void rpc_dispatch(uint16_t conn, uint32_t gen, uint32_t stream, const char *method,
		  int64_t timeout_nano, const uint8_t *payload, size_t len);
/* Re-polls every parked call; returns the earliest time (monotonic ns) at
 * which a parked call needs attention without any event, or 0. */
uint64_t rpc_poll_parked(void);
void rpc_on_conn_closed(uint16_t conn, uint32_t gen);
void call_ids(struct call *c, const char *cid, const char *eid);

/* Handlers (h_*.c). */
int h_health(struct call *, const void *, void *, struct err *);
int h_guest_info(struct call *, const void *, void *, struct err *);
int h_mount_disk(struct call *, const void *, void *, struct err *);
int h_unmount_disk(struct call *, const void *, void *, struct err *);
int h_create_container(struct call *, const void *, void *, struct err *);
int h_start_container(struct call *, const void *, void *, struct err *);
int h_exec_process(struct call *, const void *, void *, struct err *);
int h_signal_process(struct call *, const void *, void *, struct err *);
int h_wait_process(struct call *, const void *, void *, struct err *);
int h_remove_process(struct call *, const void *, void *, struct err *);
int h_remove_container(struct call *, const void *, void *, struct err *);
int h_list_processes(struct call *, const void *, void *, struct err *);
int h_pause_container(struct call *, const void *, void *, struct err *);
int h_resume_container(struct call *, const void *, void *, struct err *);
int h_update_container(struct call *, const void *, void *, struct err *);
int h_stats_container(struct call *, const void *, void *, struct err *);
int h_get_oom_event(struct call *, const void *, void *, struct err *);
int h_write_stdin(struct call *, const void *, void *, struct err *);
int h_close_stdin(struct call *, const void *, void *, struct err *);
int h_read_stdout(struct call *, const void *, void *, struct err *);
int h_read_stderr(struct call *, const void *, void *, struct err *);
int h_resize_tty(struct call *, const void *, void *, struct err *);
int h_update_interface(struct call *, const void *, void *, struct err *);
int h_update_routes(struct call *, const void *, void *, struct err *);
int h_setup_pod(struct call *, const void *, void *, struct err *);
int h_copy_file(struct call *, const void *, void *, struct err *);
int h_set_time(struct call *, const void *, void *, struct err *);
int h_shutdown(struct call *, const void *, void *, struct err *);

#endif
