#include "proc.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "jobs.h"
#include "log.h"
#include "podns.h"

struct container containers[MAX_CONTAINERS];
struct proc procs[MAX_PROCS];
static uint32_t gen_seq;

/* Exits of processes not (yet) known by pid: a detached exec can finish
 * before crun has written its pid file. */
#define ORPHANS 64
static struct {
	pid_t pid;
	int status;
	uint64_t at;
} orphans[ORPHANS];
static unsigned orphan_next;

static uint32_t next_gen(void)
{
	gen_seq = (gen_seq + 1) & 0xffffffu;
	if (!gen_seq)
		gen_seq = 1;
	return gen_seq;
}

const char *cstate_name(enum cstate s)
{
	switch (s) {
	case CS_CREATING: return "creating";
	case CS_CREATED: return "created";
	case CS_RUNNING: return "running";
	case CS_PAUSED: return "paused";
	case CS_STOPPED: return "stopped";
	}
	return "?";
}

enum cstate container_state(int ci)
{
	struct container *c = &containers[ci];
	if (c->state != CS_CREATING && c->init >= 0 && procs[c->init].exited)
		return CS_STOPPED;
	return c->state;
}

int container_find(const char *id)
{
	for (int i = 0; i < MAX_CONTAINERS; i++)
		if (containers[i].used && !strcmp(containers[i].id, id))
			return i;
	return -1;
}

int container_get(const char *id, struct err *e)
{
	int ci = container_find(id);
	if (ci < 0)
		return err_set(e, C_NOT_FOUND, "container %s not found", id);
	return ci;
}

int container_alloc(const char *id, struct err *e)
{
	for (int i = 0; i < MAX_CONTAINERS; i++) {
		struct container *c = &containers[i];
		if (c->used)
			continue;
		memset(c, 0, sizeof *c);
		c->used = true;
		c->gen = next_gen();
		snprintf(c->id, sizeof c->id, "%s", id);
		c->state = CS_CREATING;
		c->init = -1;
		c->oom_wd = -1;
		return i;
	}
	return err_set(e, C_RESOURCE_EXHAUSTED, "all %d container slots are in use", MAX_CONTAINERS);
}

void container_free(int ci)
{
	for (int i = 0; i < MAX_PROCS; i++)
		if (procs[i].used && procs[i].cont == ci)
			proc_free(i);
	containers[ci].used = false;
}

int proc_find(int ci, const char *eid)
{
	for (int i = 0; i < MAX_PROCS; i++)
		if (procs[i].used && procs[i].cont == ci && !strcmp(procs[i].exec_id, eid))
			return i;
	return -1;
}

int proc_get(const char *cid, const char *eid, struct err *e)
{
	int ci = container_get(cid, e);
	if (ci < 0)
		return -1;
	int pi = proc_find(ci, eid);
	if (pi < 0)
		return err_set(e, C_NOT_FOUND, "exec %s in container %s not found", eid, cid);
	return pi;
}

static void stream_init(struct stream *s)
{
	s->fd = -1;
	s->ev = 0;
	s->eof = false;
	s->head = s->len = 0;
}

int proc_alloc(int ci, const char *eid, struct err *e)
{
	int pi = -1;
	for (int i = 0; i < MAX_PROCS && pi < 0; i++)
		if (!procs[i].used)
			pi = i;
	if (pi < 0) {
		/* Full: recycle the exec that finished longest ago and whose exit
		 * was already collected. */
		uint64_t oldest = UINT64_MAX;
		for (int i = 0; i < MAX_PROCS; i++) {
			struct proc *p = &procs[i];
			if (p->exec_id[0] && p->exited && p->exit_delivered && p->exited_at < oldest) {
				oldest = p->exited_at;
				pi = i;
			}
		}
		if (pi < 0)
			return err_set(e, C_RESOURCE_EXHAUSTED, "all %d process slots are in use", MAX_PROCS);
		alog("recycling the slot of exec %s in %s", procs[pi].exec_id,
		     containers[procs[pi].cont].id);
		proc_free(pi);
	}
	struct proc *p = &procs[pi];
	p->used = true;
	p->gen = next_gen();
	p->cont = ci;
	snprintf(p->exec_id, sizeof p->exec_id, "%s", eid);
	p->pid = 0;
	p->exited = p->exit_delivered = false;
	p->exit_status = 0;
	p->exited_at = 0;
	p->tty = false;
	p->pty = -1;
	p->stdin_fd = -1;
	p->stdin_ev = 0;
	p->stdin_parked = false;
	stream_init(&p->out);
	stream_init(&p->err);
	return pi;
}

static void set_interest(int fd, uint32_t *cur, uint32_t want, uint64_t tag)
{
	if (fd < 0 || want == *cur)
		return;
	int rc;
	if (*cur == 0)
		rc = ev_add(fd, want, tag);
	else if (want == 0) {
		ev_del(fd);
		rc = 0;
	} else
		rc = ev_mod(fd, want, tag);
	if (rc < 0) {
		alog("epoll fd %d: %s", fd, strerror(errno));
		return;
	}
	*cur = want;
}

static void stream_close(struct stream *s, bool owns_fd)
{
	if (s->fd >= 0) {
		if (s->ev)
			ev_del(s->fd);
		if (owns_fd)
			close(s->fd);
	}
	s->fd = -1;
	s->ev = 0;
}

static void stdin_close(struct proc *p)
{
	if (p->stdin_fd >= 0 && !p->tty) {
		if (p->stdin_ev)
			ev_del(p->stdin_fd);
		close(p->stdin_fd);
	}
	p->stdin_fd = -1;
	p->stdin_ev = 0;
}

void proc_free(int pi)
{
	struct proc *p = &procs[pi];
	if (!p->used)
		return;
	stdin_close(p);
	stream_close(&p->out, !p->tty);
	stream_close(&p->err, true);
	if (p->pty >= 0) {
		/* The pty may still be registered through out (already closed above). */
		close(p->pty);
		p->pty = -1;
	}
	p->used = false;
}

void proc_update_epoll(int pi)
{
	struct proc *p = &procs[pi];
	if (!p->used)
		return;
	uint32_t want_out = (p->out.fd >= 0 && !p->out.eof && p->out.len < STREAM_BUF) ? EPOLLIN : 0;
	uint32_t want_err = (p->err.fd >= 0 && !p->err.eof && p->err.len < STREAM_BUF) ? EPOLLIN : 0;
	uint32_t want_in = (p->stdin_fd >= 0 && p->stdin_parked) ? EPOLLOUT : 0;
	if (p->tty) {
		/* One fd, one registration: the pty carries stdout and stdin. */
		set_interest(p->pty, &p->out.ev, want_out | want_in, tag_make(TAG_STDOUT, pi, p->gen));
		return;
	}
	set_interest(p->out.fd, &p->out.ev, want_out, tag_make(TAG_STDOUT, pi, p->gen));
	set_interest(p->err.fd, &p->err.ev, want_err, tag_make(TAG_STDERR, pi, p->gen));
	set_interest(p->stdin_fd, &p->stdin_ev, want_in, tag_make(TAG_STDIN, pi, p->gen));
}

static int pipe_pair(int fds[2], struct err *e)
{
	if (pipe2(fds, O_CLOEXEC) < 0)
		return err_sys(e, "pipe");
	return 0;
}

void close_child_fds(int child_fds[3])
{
	for (int i = 0; i < 3; i++) {
		if (child_fds[i] >= 0)
			close(child_fds[i]);
		child_fds[i] = -1;
	}
}

int proc_pipes(int pi, bool want_stdin, int child_fds[3], struct err *e)
{
	struct proc *p = &procs[pi];
	int in[2] = {-1, -1}, out[2] = {-1, -1}, errp[2] = {-1, -1};
	child_fds[0] = child_fds[1] = child_fds[2] = -1;
	if (want_stdin) {
		if (pipe_pair(in, e) < 0)
			goto fail;
	} else {
		in[0] = open("/dev/null", O_RDONLY | O_CLOEXEC);
		if (in[0] < 0) {
			err_sys(e, "open /dev/null");
			goto fail;
		}
	}
	if (pipe_pair(out, e) < 0 || pipe_pair(errp, e) < 0)
		goto fail;
	for (int *fd = (int[]){in[1], out[0], errp[0]}, k = 0; k < 3; k++)
		if (fd[k] >= 0 && fcntl(fd[k], F_SETFL, O_NONBLOCK) < 0) {
			err_sys(e, "fcntl O_NONBLOCK");
			goto fail;
		}
	/* Room for the process to write on while a read reply crosses the VM
	 * boundary; pages are only allocated for what is in the pipe. */
	for (int *fd = (int[]){out[0], errp[0]}, k = 0; k < 2; k++)
		if (fcntl(fd[k], F_SETPIPE_SZ, OUTPUT_PIPE_SIZE) < 0)
			alog("output pipe size %d: %s", OUTPUT_PIPE_SIZE, strerror(errno));
	p->stdin_fd = in[1];
	p->out.fd = out[0];
	p->err.fd = errp[0];
	child_fds[0] = in[0];
	child_fds[1] = out[1];
	child_fds[2] = errp[1];
	proc_update_epoll(pi);
	return 0;
fail:
	for (int *fd = (int[]){in[0], in[1], out[0], out[1], errp[0], errp[1]}, k = 0; k < 6; k++)
		if (fd[k] >= 0)
			close(fd[k]);
	return -1;
}

void proc_attach_pty(int pi, int master)
{
	struct proc *p = &procs[pi];
	p->tty = true;
	p->pty = master;
	p->out.fd = master;
	p->stdin_fd = master;
	p->err.eof = true; /* a TTY has no separate stderr */
	proc_update_epoll(pi);
}

static void mark_exit(struct proc *p, int status, uint64_t at)
{
	p->exited = true;
	p->exit_status = status;
	p->exited_at = at;
}

void proc_set_pid(int pi, pid_t pid)
{
	struct proc *p = &procs[pi];
	p->pid = pid;
	uint64_t now = wall_ns();
	for (int k = 0; k < ORPHANS; k++) {
		if (orphans[k].pid == pid && now - orphans[k].at < 60ull * 1000000000) {
			mark_exit(p, orphans[k].status, orphans[k].at);
			alog("process %d (%s%s%s) exited with status %d", pid, containers[p->cont].id,
			     p->exec_id[0] ? " exec " : "", p->exec_id, p->exit_status);
			orphans[k].pid = 0;
			break;
		}
	}
}

static void on_exit(pid_t pid, int status)
{
	uint64_t now = wall_ns();
	if (job_on_exit(pid, status) || podns_on_exit(pid, status))
		return;
	for (int i = 0; i < MAX_PROCS; i++) {
		struct proc *p = &procs[i];
		if (p->used && p->pid == pid && !p->exited) {
			mark_exit(p, status, now);
			alog("process %d (%s%s%s) exited with status %d", pid, containers[p->cont].id,
			     p->exec_id[0] ? " exec " : "", p->exec_id, status);
			return;
		}
	}
	orphans[orphan_next].pid = pid;
	orphans[orphan_next].status = status;
	orphans[orphan_next].at = now;
	orphan_next = (orphan_next + 1) % ORPHANS;
}

void reap_children(void)
{
	for (;;) {
		int st;
		pid_t pid = waitpid(-1, &st, WNOHANG);
		if (pid <= 0) {
			if (pid < 0 && errno == EINTR)
				continue;
			return;
		}
		int status = WIFEXITED(st) ? WEXITSTATUS(st) : WIFSIGNALED(st) ? 128 + WTERMSIG(st) : 255;
		on_exit(pid, status);
	}
}

/* One read of a stream's fd into dst: n > 0 bytes, or 0 when there is nothing
 * now (EAGAIN) or ever (EOF: s->eof set and the fd closed or unregistered). */
static size_t stream_read(struct proc *p, struct stream *s, uint8_t *dst, size_t room)
{
	for (;;) {
		ssize_t n = read(s->fd, dst, room);
		if (n > 0)
			return (size_t)n;
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN)
			return 0;
		/* EOF; EIO is how a pty master reports that the slave side is gone. */
		if (n < 0 && errno != EIO)
			alog("read output of %s: %s", containers[p->cont].id, strerror(errno));
		s->eof = true;
		if (p->tty) {
			if (s->ev)
				ev_del(s->fd);
			s->ev = 0;
		} else {
			stream_close(s, true);
		}
		return 0;
	}
}

static void stream_fill(struct proc *p, struct stream *s)
{
	while (s->fd >= 0 && !s->eof && s->len < STREAM_BUF) {
		if (s->len == 0)
			s->head = 0;
		uint32_t tail = (s->head + s->len) % STREAM_BUF;
		uint32_t room = tail >= s->head ? STREAM_BUF - tail : s->head - tail;
		size_t n = stream_read(p, s, s->buf + tail, room);
		if (n == 0)
			break;
		s->len += (uint32_t)n;
	}
}

void proc_on_event(enum tag_kind k, uint32_t idx, uint32_t gen, uint32_t events)
{
	if (idx >= MAX_PROCS || !procs[idx].used || procs[idx].gen != gen)
		return;
	struct proc *p = &procs[idx];
	if (k == TAG_STDOUT && (events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
		stream_fill(p, &p->out);
	else if (k == TAG_STDERR)
		stream_fill(p, &p->err);
	/* TAG_STDIN / EPOLLOUT only wake the loop: the parked write retries. */
	proc_update_epoll((int)idx);
}

size_t proc_take(int pi, bool is_stderr, uint8_t *dst, size_t max)
{
	struct proc *p = &procs[pi];
	struct stream *s = is_stderr ? &p->err : &p->out;
	size_t n = s->len < max ? s->len : max;
	size_t first = STREAM_BUF - s->head;
	if (first > n)
		first = n;
	memcpy(dst, s->buf + s->head, first);
	memcpy(dst + first, s->buf, n - first);
	s->head = (uint32_t)((s->head + n) % STREAM_BUF);
	s->len -= (uint32_t)n;
	/* The buffer is empty: what else the pipe holds goes straight into dst, one
	 * copy instead of two, and one reply instead of many. */
	while (s->len == 0 && n < max && s->fd >= 0 && !s->eof) {
		size_t got = stream_read(p, s, dst + n, max - n);
		if (got == 0)
			break;
		n += got;
	}
	if (n) {
		/* Space again: pull in whatever the process has written meanwhile. */
		stream_fill(p, s);
		proc_update_epoll(pi);
	}
	return n;
}
