/* crun runs as an asynchronous job: spawned with the process's stdio, reaped
 * by the event loop, and finished by a per-kind callback that updates the
 * container tables. A call waiting on a job parks on it; if the caller goes
 * away (deadline, connection closed) the job still finishes its bookkeeping. */
#ifndef AGENT_JOBS_H
#define AGENT_JOBS_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "err.h"

struct job;
typedef void (*job_done_fn)(struct job *j, bool ok);

struct job {
	bool used;
	uint32_t gen;
	pid_t pid;
	const char *what;      /* "create", "exec", ... for messages */
	int cont;
	uint32_t cont_gen;
	int proc;              /* -1 if none */
	uint32_t proc_gen;
	int console_fd;        /* listening console socket, -1 if none */
	char console_path[108];
	char log_path[64];
	bool force;
	bool has_waiter;
	bool finished;
	struct err err;        /* result when !ok */
	uint32_t result_pid;
	job_done_fn done;
};

/* Reserves a job slot; the caller fills cont/proc (and a console socket). */
struct job *job_alloc(struct err *e);
/* Spawns `crun --root R --log file:L <args...>` with fds 0-2 = stdio
 * (-1: /dev/null). On failure the slot is freed. */
int job_start(struct job *j, const char *const *args, const int stdio[3], job_done_fn done,
	      struct err *e);
/* Frees a reserved job that was never started. */
void job_abort(struct job *j);
/* Called by the reaper; true if pid was a job. */
bool job_on_exit(pid_t pid, int status);
struct job *job_ref(int idx, uint32_t gen);
int job_index(const struct job *j);
void job_release(struct job *j);   /* the waiter is gone; frees a finished job */

/* Console socket for crun --console-socket; returns the path. */
int console_listen(struct job *j, int pi, struct err *e);
/* After crun exits: receives the pty master crun sent over the socket. */
int console_receive(struct job *j, struct err *e);
void console_close(struct job *j);

#endif
