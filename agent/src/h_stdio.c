/* Process stdio RPCs: long-poll reads, writes that park while the pipe is
 * full, stdin close, TTY resize. */
#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "agent.h"
#include "log.h"
#include "proc.h"
#include "rpc.h"

static struct proc *proc_ref(struct call *c, struct err *e)
{
	struct proc *p = &procs[c->u.proc.idx];
	if (!p->used || p->gen != c->u.proc.gen) {
		err_set(e, C_NOT_FOUND, "process removed");
		return NULL;
	}
	return p;
}

static int ref_proc(struct call *c, const char *cid, const char *eid, struct err *e)
{
	call_ids(c, cid, eid);
	int pi = proc_get(cid, eid, e);
	if (pi < 0)
		return -1;
	c->u.proc.idx = pi;
	c->u.proc.gen = procs[pi].gen;
	return pi;
}

/* ---- ReadStdout / ReadStderr ---- */

static int read_poll(struct call *c, void *vresp, struct err *e, bool is_err)
{
	struct proc *p = proc_ref(c, e);
	if (!p)
		return R_ERR;
	struct stream *s = is_err ? &p->err : &p->out;
	PB(ReadOutputResponse) *resp = vresp;
	if (s->len) {
		resp->data.size = (pb_size_t)proc_take(c->u.proc.idx, is_err, resp->data.bytes, c->u.proc.max_bytes);
		return R_DONE;
	}
	/* fd < 0 before crun reported the process (its pty is not here yet). */
	if (s->eof || (s->fd < 0 && p->pid > 0)) {
		resp->eof = true;
		c->loud = true;
		return R_DONE;
	}
	return R_PARK;
}

static int out_poll(struct call *c, void *resp, struct err *e) { return read_poll(c, resp, e, false); }
static int err_poll(struct call *c, void *resp, struct err *e) { return read_poll(c, resp, e, true); }

static int read_common(struct call *c, const PB(ReadOutputRequest) *r, void *resp, struct err *e, bool is_err)
{
	if (ref_proc(c, r->container_id, r->exec_id, e) < 0)
		return R_ERR;
	uint32_t max = r->max_bytes;
	if (max == 0 || max > READ_MAX)
		max = READ_MAX;
	c->u.proc.max_bytes = max;
	c->poll = is_err ? err_poll : out_poll;
	return c->poll(c, resp, e);
}

int h_read_stdout(struct call *c, const void *req, void *resp, struct err *e)
{
	return read_common(c, req, resp, e, false);
}

int h_read_stderr(struct call *c, const void *req, void *resp, struct err *e)
{
	return read_common(c, req, resp, e, true);
}

/* ---- WriteStdin ---- */

/* n > 0 written; 0 would block; -1 error. */
static ssize_t stdin_write(struct proc *p, const uint8_t *data, size_t len, struct err *e)
{
	if (p->stdin_fd < 0)
		return err_set(e, C_FAILED_PRECONDITION, "stdin is closed");
	for (;;) {
		ssize_t n = write(p->stdin_fd, data, len);
		if (n >= 0)
			return n;
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN)
			return 0;
		err_sys(e, "write stdin");
		if (errno == EPIPE || errno == EIO)
			e->code = C_FAILED_PRECONDITION;
		return -1;
	}
}

static int stdin_poll(struct call *c, void *vresp, struct err *e)
{
	struct proc *p = proc_ref(c, e);
	if (!p)
		return R_ERR;
	ssize_t n = stdin_write(p, c->u.proc.data, c->u.proc.len, e);
	if (n < 0)
		return R_ERR;
	if (n == 0)
		return R_PARK;
	((PB(WriteStdinResponse) *)vresp)->written = (uint32_t)n;
	return R_DONE;
}

static void stdin_release(struct call *c)
{
	struct proc *p = &procs[c->u.proc.idx];
	if (p->used && p->gen == c->u.proc.gen) {
		p->stdin_parked = false;
		proc_update_epoll(c->u.proc.idx);
	}
}

int h_write_stdin(struct call *c, const void *vreq, void *vresp, struct err *e)
{
	const PB(WriteStdinRequest) *r = vreq;
	int pi = ref_proc(c, r->container_id, r->exec_id, e);
	if (pi < 0)
		return R_ERR;
	struct proc *p = &procs[pi];
	if (p->stdin_parked)
		return err_set(e, C_FAILED_PRECONDITION, "a write to this stdin is already pending");
	if (r->data.size == 0)
		return R_DONE;
	ssize_t n = stdin_write(p, r->data.bytes, r->data.size, e);
	if (n < 0)
		return R_ERR;
	if (n > 0) {
		((PB(WriteStdinResponse) *)vresp)->written = (uint32_t)n;
		return R_DONE;
	}
	/* Full: keep the head of the data and finish when there is room; the
	 * caller resends the rest, as with any partial write. */
	c->u.proc.len = r->data.size < PARK_STDIN_MAX ? r->data.size : PARK_STDIN_MAX;
	memcpy(c->u.proc.data, r->data.bytes, c->u.proc.len);
	c->poll = stdin_poll;
	c->release = stdin_release;
	p->stdin_parked = true;
	proc_update_epoll(pi);
	return R_PARK;
}

/* ---- CloseStdin ---- */

int h_close_stdin(struct call *c, const void *vreq, void *vresp, struct err *e)
{
	const PB(ProcessRequest) *r = vreq;
	(void)vresp;
	int pi = ref_proc(c, r->container_id, r->exec_id, e);
	if (pi < 0)
		return R_ERR;
	struct proc *p = &procs[pi];
	if (p->stdin_fd < 0)
		return R_DONE;
	if (p->tty) {
		/* The pty stays open for output: send end-of-file (^D) instead. */
		ssize_t n = write(p->pty, "\x04", 1);
		(void)n;
		p->stdin_fd = -1;
		proc_update_epoll(pi);
		return R_DONE;
	}
	if (p->stdin_ev)
		ev_del(p->stdin_fd);
	close(p->stdin_fd);
	p->stdin_fd = -1;
	p->stdin_ev = 0;
	return R_DONE;
}

/* ---- ResizeTty ---- */

int h_resize_tty(struct call *c, const void *vreq, void *vresp, struct err *e)
{
	const PB(ResizeTtyRequest) *r = vreq;
	(void)vresp;
	int pi = ref_proc(c, r->container_id, r->exec_id, e);
	if (pi < 0)
		return R_ERR;
	struct proc *p = &procs[pi];
	if (!p->tty || p->pty < 0)
		return err_set(e, C_FAILED_PRECONDITION, "process has no terminal");
	if (r->rows > 65535 || r->cols > 65535)
		return err_set(e, C_INVALID_ARGUMENT, "size %ux%u out of range", r->rows, r->cols);
	struct winsize ws = {.ws_row = (unsigned short)r->rows, .ws_col = (unsigned short)r->cols};
	if (ioctl(p->pty, TIOCSWINSZ, &ws) < 0)
		return err_sys(e, "resize pty");
	return R_DONE;
}
