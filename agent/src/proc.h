/* Containers and their processes (init + execs): fixed tables, stdio pipes or
 * pty, bounded output buffers with back-pressure, and exit bookkeeping fed by
 * the reaper. */
#ifndef AGENT_PROC_H
#define AGENT_PROC_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "agent.h"
#include "err.h"

enum cstate {
	CS_CREATING = 1,
	CS_CREATED,
	CS_RUNNING,
	CS_PAUSED,
	CS_STOPPED, /* derived: the init process exited */
};

struct container {
	bool used;
	uint32_t gen;
	char id[ID_MAX];
	enum cstate state;    /* CS_STOPPED is never stored, see container_state() */
	const char *busy;     /* the crun command in flight that changes state, or NULL */
	int init;             /* proc index */
	bool overlay;         /* <bundle>/rootfs is our overlay mount */
	bool tmpfs_upper;     /* <bundle>/rw is a tmpfs holding the overlay's upper */
	bool own_pidns;       /* init is PID 1 of its own PID namespace */
	char cgroup[256];     /* /sys/fs/cgroup/..., "" until known */
	int oom_wd;           /* inotify watch on memory.events, -1 if none */
	unsigned long long oom_kill;
	unsigned seq;         /* names per-exec files */
};

struct stream {
	int fd;               /* -1 when closed; for a TTY stdout this is the pty */
	uint32_t ev;          /* registered epoll events, 0 = not registered */
	bool eof;
	uint32_t head, len;
	uint8_t buf[STREAM_BUF];
};

struct proc {
	bool used;
	uint32_t gen;
	int cont;
	char exec_id[ID_MAX]; /* "" for the init process */
	pid_t pid;            /* 0 until crun reported it */
	bool exited;
	bool exit_delivered;  /* a WaitProcess returned the exit */
	int exit_status;
	uint64_t exited_at;   /* unix ns */
	bool tty;
	int pty;              /* master, -1 if none */
	int stdin_fd;         /* pipe write end or the pty; -1 when closed/none */
	uint32_t stdin_ev;
	bool stdin_parked;    /* a WriteStdin is waiting for room */
	struct stream out, err;
};

extern struct container containers[MAX_CONTAINERS];
extern struct proc procs[MAX_PROCS];

int container_find(const char *id);
int container_alloc(const char *id, struct err *e);
void container_free(int ci);
enum cstate container_state(int ci);
const char *cstate_name(enum cstate s);
/* Looks a container up; NOT_FOUND error if absent. */
int container_get(const char *id, struct err *e);
/* Process by ids; NOT_FOUND error if absent. */
int proc_get(const char *cid, const char *eid, struct err *e);
int proc_find(int ci, const char *eid);
int proc_alloc(int ci, const char *eid, struct err *e);
void proc_free(int pi);

/* Makes the pipes for a non-TTY process; child_fds get the ends the child
 * uses (stdin is /dev/null without want_stdin). close_child_fds after spawn. */
int proc_pipes(int pi, bool want_stdin, int child_fds[3], struct err *e);
void close_child_fds(int child_fds[3]);
void proc_attach_pty(int pi, int master);
void proc_set_pid(int pi, pid_t pid);
void proc_update_epoll(int pi);
void proc_on_event(enum tag_kind k, uint32_t idx, uint32_t gen, uint32_t events);

/* Copies up to max buffered bytes of a stream out; re-arms reading. */
size_t proc_take(int pi, bool is_stderr, uint8_t *dst, size_t max);

/* Reaps every exited child; hands crun exits to the job table. */
void reap_children(void);

#endif
