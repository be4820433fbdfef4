#include "ttrpc.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <linux/vm_sockets.h>

#include "agent.h"
#include "log.h"
#include "pb_decode.h"
#include "pb_encode.h"
#include "peer.h"
#include "ttrpc.pb.h"

#define HDR 10
#define T_REQUEST 1
#define T_RESPONSE 2
#define T_DATA 3
#define F_REMOTE_OPEN 2

struct conn {
	bool used;
	bool dead;        /* failed or hung up: closed in housekeeping */
	bool stalled;     /* stopped parsing requests until output drains */
	uint32_t gen;
	int fd;
	uint32_t events;  /* current epoll interest */
	uint32_t last_stream;
	uint32_t discard_left; /* bytes of an over-limit frame still to skip */
	size_t in_len;
	size_t out_head, out_tail;
};

static ttrpc_dispatch_fn on_request;
static ttrpc_closed_fn on_closed;
static struct conn conns[MAX_CONNS];
static uint8_t in_bufs[MAX_CONNS][IN_CAP];
static uint8_t out_bufs[MAX_CONNS][OUT_CAP];
static uint32_t conn_gen_seq;

_Static_assert(MAX_CONNS < 65536, "conn index is 16 bits");

void ttrpc_init(ttrpc_dispatch_fn dispatch, ttrpc_closed_fn closed)
{
	on_request = dispatch;
	on_closed = closed;
}

static int listen_fd_common(int fd, struct sockaddr *sa, socklen_t len, const char *what,
			    enum tag_kind kind, struct err *e)
{
	if (bind(fd, sa, len) < 0) {
		err_sys(e, "bind %s", what);
		close(fd);
		return -1;
	}
	if (listen(fd, 16) < 0) {
		err_sys(e, "listen %s", what);
		close(fd);
		return -1;
	}
	if (ev_add(fd, EPOLLIN, tag_make(kind, (uint32_t)fd, 0)) < 0) {
		err_sys(e, "epoll add %s", what);
		close(fd);
		return -1;
	}
	return fd;
}

int ttrpc_listen_vsock(unsigned port, struct err *e)
{
	int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return err_sys(e, "socket AF_VSOCK");
	struct sockaddr_vm sa = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
	char what[48];
	snprintf(what, sizeof what, "vsock port %u", port);
	return listen_fd_common(fd, (struct sockaddr *)&sa, sizeof sa, what, TAG_LISTEN, e);
}

int ttrpc_listen_unix(const char *path, struct err *e)
{
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return err_sys(e, "socket AF_UNIX");
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	if (strlen(path) >= sizeof sa.sun_path)
		return err_set(e, C_INVALID_ARGUMENT, "socket path %s: too long", path);
	strcpy(sa.sun_path, path);
	unlink(path);
	return listen_fd_common(fd, (struct sockaddr *)&sa, sizeof sa, path, TAG_DEBUG_LISTEN, e);
}

static void conn_set_events(uint16_t i)
{
	struct conn *c = &conns[i];
	uint32_t ev = 0;
	if (!c->stalled && c->in_len < IN_CAP)
		ev |= EPOLLIN;
	if (c->out_tail > c->out_head)
		ev |= EPOLLOUT;
	if (ev == c->events)
		return;
	if (ev_mod(c->fd, ev, tag_make(TAG_CONN, i, c->gen)) < 0) {
		alog("conn %u: epoll mod: %s", i, strerror(errno));
		c->dead = true;
		return;
	}
	c->events = ev;
}

void ttrpc_on_listen(int lfd)
{
	for (;;) {
		struct sockaddr_storage sa;
		socklen_t len = sizeof sa;
		memset(&sa, 0, sizeof sa);
		int fd = accept4(lfd, (struct sockaddr *)&sa, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno != EAGAIN && errno != EINTR)
				alog("accept: %s", strerror(errno));
			return;
		}
		if (!vsock_peer_allowed(fd, &sa, len, "ttrpc"))
			continue;
		int i;
		for (i = 0; i < MAX_CONNS && conns[i].used; i++)
			;
		if (i == MAX_CONNS) {
			alog("accept: refusing a connection: all %d slots in use", MAX_CONNS);
			close(fd);
			continue;
		}
		struct conn *c = &conns[i];
		memset(c, 0, sizeof *c);
		c->used = true;
		c->fd = fd;
		c->gen = ++conn_gen_seq & 0xffffffu;
		c->events = EPOLLIN;
		if (ev_add(fd, EPOLLIN, tag_make(TAG_CONN, i, c->gen)) < 0) {
			alog("accept: epoll add: %s", strerror(errno));
			close(fd);
			c->used = false;
			continue;
		}
		alog("conn %d: open", i);
	}
}

static void conn_close(uint16_t i)
{
	struct conn *c = &conns[i];
	ev_del(c->fd);
	close(c->fd);
	c->used = false;
	alog("conn %u: closed", i);
	on_closed(i, c->gen);
}

bool ttrpc_alive(uint16_t i, uint32_t gen)
{
	return i < MAX_CONNS && conns[i].used && !conns[i].dead && conns[i].gen == gen;
}

static size_t out_free(const struct conn *c)
{
	return OUT_CAP - (c->out_tail - c->out_head);
}

bool ttrpc_can_reply(uint16_t i, uint32_t gen)
{
	return ttrpc_alive(i, gen) && out_free(&conns[i]) >= MAX_RESP_FRAME;
}

static void conn_flush(uint16_t i)
{
	struct conn *c = &conns[i];
	while (c->out_tail > c->out_head) {
		ssize_t n = send(c->fd, out_bufs[i] + c->out_head, c->out_tail - c->out_head,
				 MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN) {
				alog("conn %u: send: %s", i, strerror(errno));
				c->dead = true;
			}
			break;
		}
		c->out_head += (size_t)n;
	}
	if (c->out_head == c->out_tail)
		c->out_head = c->out_tail = 0;
}

struct payload_span {
	const uint8_t *p;
	size_t len;
};

/* A reply's payload: the handler's response message, encoded straight into the
 * frame (no intermediate buffer: a ReadStdout reply is up to 1 MiB). */
struct payload_msg {
	const pb_msgdesc_t *fields;
	const void *src;
};

static bool encode_payload(pb_ostream_t *s, const pb_field_t *f, void *const *arg)
{
	const struct payload_msg *pm = *arg;
	if (!pm->fields)
		return true;
	return pb_encode_tag_for_field(s, f) && pb_encode_submessage(s, pm->fields, pm->src);
}

int ttrpc_reply(uint16_t i, uint32_t gen, uint32_t stream, int code, const char *msg,
		const pb_msgdesc_t *fields, const void *src)
{
	if (!ttrpc_alive(i, gen))
		return -1;
	struct conn *c = &conns[i];
	size_t len = 0;
	if (fields && !pb_get_encoded_size(&len, fields, src)) {
		alog("conn %u: response does not encode", i);
		return -2;
	}
	/* Header, envelope (status, payload tag and length) and the payload. */
	size_t need = HDR + 600 + 8 + len;
	if (out_free(c) < need)
		return -1;
	if (OUT_CAP - c->out_tail < need) {
		memmove(out_bufs[i], out_bufs[i] + c->out_head, c->out_tail - c->out_head);
		c->out_tail -= c->out_head;
		c->out_head = 0;
	}
	uint8_t *h = out_bufs[i] + c->out_tail;
	struct payload_msg pm = {fields, src};
	ttrpc_Response r = ttrpc_Response_init_zero;
	if (code != C_OK) {
		r.has_status = true;
		r.status.code = code;
		snprintf(r.status.message, sizeof r.status.message, "%s", msg ? msg : "");
	}
	r.payload.funcs.encode = encode_payload;
	r.payload.arg = &pm;
	pb_ostream_t os = pb_ostream_from_buffer(h + HDR, OUT_CAP - c->out_tail - HDR);
	if (!pb_encode(&os, ttrpc_Response_fields, &r)) {
		alog("conn %u: encode response: %s", i, PB_GET_ERROR(&os));
		return -2;
	}
	uint32_t n = (uint32_t)os.bytes_written;
	h[0] = n >> 24; h[1] = n >> 16; h[2] = n >> 8; h[3] = n;
	h[4] = stream >> 24; h[5] = stream >> 16; h[6] = stream >> 8; h[7] = stream;
	h[8] = T_RESPONSE;
	h[9] = 0;
	c->out_tail += HDR + n;
	conn_flush(i);
	conn_set_events(i);
	return 0;
}

static bool decode_payload(pb_istream_t *s, const pb_field_t *f, void **arg)
{
	(void)f;
	struct payload_span *sp = *arg;
	/* A buffer istream's state is the read position inside the frame buffer,
	 * which stays put while the request is handled: no copy needed. */
	sp->p = s->state;
	sp->len = s->bytes_left;
	return pb_read(s, NULL, s->bytes_left);
}

static void reply_status(uint16_t i, uint32_t stream, int code, const char *fmt, const char *arg)
{
	char msg[256];
	snprintf(msg, sizeof msg, fmt, arg);
	alog("conn %u stream %u: %s %s", i, stream, code_name(code), msg);
	ttrpc_reply(i, conns[i].gen, stream, code, msg, NULL, NULL);
}

static void handle_frame(uint16_t i, uint32_t stream, uint8_t type, uint8_t flags,
			 const uint8_t *data, uint32_t len)
{
	struct conn *c = &conns[i];
	if (type != T_REQUEST) {
		/* Unary only: no stream the client could send data on exists. */
		alog("conn %u stream %u: ignoring message type %u", i, stream, type);
		return;
	}
	if (stream % 2 != 1) {
		reply_status(i, stream, C_INVALID_ARGUMENT, "%s",
			     "StreamID must be odd for client initiated streams");
		return;
	}
	if (stream <= c->last_stream) {
		reply_status(i, stream, C_INVALID_ARGUMENT, "%s",
			     "StreamID cannot be re-used and must increment");
		return;
	}
	c->last_stream = stream;

	static ttrpc_Request req;
	struct payload_span sp = {NULL, 0};
	memset(&req, 0, sizeof req);
	req.payload.funcs.decode = decode_payload;
	req.payload.arg = &sp;
	pb_istream_t is = pb_istream_from_buffer(data, len);
	if (!pb_decode(&is, ttrpc_Request_fields, &req)) {
		reply_status(i, stream, C_INVALID_ARGUMENT, "decode request: %s", PB_GET_ERROR(&is));
		return;
	}
	if (flags & F_REMOTE_OPEN) {
		reply_status(i, stream, C_UNIMPLEMENTED, "streaming method %s", req.method);
		return;
	}
	if (strcmp(req.service, AGENT_SERVICE) != 0) {
		reply_status(i, stream, C_UNIMPLEMENTED, "service %s", req.service);
		return;
	}
	on_request(i, c->gen, stream, req.method, req.timeout_nano, sp.p ? sp.p : data, sp.len);
}

/* Parses every complete frame in the input buffer while responses still fit. */
static void conn_process(uint16_t i)
{
	struct conn *c = &conns[i];
	uint8_t *in = in_bufs[i];
	size_t off = 0;
	bool was_stalled = c->stalled;
	c->stalled = false;
	while (!c->dead) {
		size_t avail = c->in_len - off;
		if (c->discard_left) {
			size_t n = avail < c->discard_left ? avail : c->discard_left;
			off += n;
			c->discard_left -= (uint32_t)n;
			if (c->discard_left)
				break;
			continue;
		}
		if (avail < HDR)
			break;
		const uint8_t *h = in + off;
		uint32_t len = (uint32_t)h[0] << 24 | (uint32_t)h[1] << 16 | (uint32_t)h[2] << 8 | h[3];
		uint32_t stream = (uint32_t)h[4] << 24 | (uint32_t)h[5] << 16 | (uint32_t)h[6] << 8 | h[7];
		if (!ttrpc_can_reply(i, c->gen)) {
			if (!was_stalled)
				alog("conn %u: %zu bytes of replies unsent: pausing requests", i,
				     c->out_tail - c->out_head);
			c->stalled = true;
			break;
		}
		if (len > MAX_FRAME_DATA || (size_t)len + HDR > IN_CAP) {
			char msg[96];
			snprintf(msg, sizeof msg, "message length %u exceed maximum message size of %u",
				 len, len > MAX_FRAME_DATA ? MAX_FRAME_DATA : (unsigned)(IN_CAP - HDR));
			reply_status(i, stream, C_RESOURCE_EXHAUSTED, "%s", msg);
			off += HDR;
			c->discard_left = len;
			continue;
		}
		if (avail < HDR + (size_t)len)
			break;
		handle_frame(i, stream, h[8], h[9], h + HDR, len);
		off += HDR + len;
	}
	if (was_stalled && !c->stalled)
		alog("conn %u: replies drained: resuming requests", i);
	if (off) {
		memmove(in, in + off, c->in_len - off);
		c->in_len -= off;
	}
}

void ttrpc_on_conn(uint32_t idx, uint32_t gen, uint32_t events)
{
	if (idx >= MAX_CONNS || !conns[idx].used || conns[idx].gen != gen)
		return;
	uint16_t i = (uint16_t)idx;
	struct conn *c = &conns[i];
	if (events & EPOLLOUT)
		conn_flush(i);
	if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
		while (!c->dead && c->in_len < IN_CAP) {
			ssize_t n = read(c->fd, in_bufs[i] + c->in_len, IN_CAP - c->in_len);
			if (n < 0) {
				if (errno == EINTR)
					continue;
				if (errno != EAGAIN) {
					alog("conn %u: read: %s", i, strerror(errno));
					c->dead = true;
				}
				break;
			}
			if (n == 0) {
				c->dead = true;
				break;
			}
			c->in_len += (size_t)n;
			conn_process(i);
			if (c->stalled)
				break;
		}
	}
	if (!c->dead)
		conn_set_events(i);
}

void ttrpc_housekeeping(void)
{
	for (uint16_t i = 0; i < MAX_CONNS; i++) {
		struct conn *c = &conns[i];
		if (!c->used)
			continue;
		if (c->dead) {
			conn_close(i);
			continue;
		}
		if (c->stalled && ttrpc_can_reply(i, c->gen))
			conn_process(i);
		conn_set_events(i);
	}
}

void ttrpc_flush_blocking(uint16_t i, uint32_t gen, int ms)
{
	uint64_t end = now_ns() + (uint64_t)ms * 1000000;
	while (ttrpc_alive(i, gen) && conns[i].out_tail > conns[i].out_head) {
		uint64_t now = now_ns();
		if (now >= end)
			break;
		struct pollfd p = {.fd = conns[i].fd, .events = POLLOUT};
		poll(&p, 1, (int)((end - now) / 1000000) + 1);
		conn_flush(i);
	}
}
