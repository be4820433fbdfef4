#include "relay.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <linux/vm_sockets.h>

#include "agent.h"
#include "ev.h"
#include "log.h"
#include "pb_decode.h"
#include "pb_encode.h"
#include "peer.h"

#define T_DATA 1
#define T_EOF 2
#define HELLO_MAX 64
#define OPEN_TIMEOUT_NS (10 * 1000000000ull)

enum rstate { RS_HELLO = 1, RS_CONNECTING, RS_OPEN };

struct relay {
	bool used;
	uint32_t gen;
	enum rstate st;
	int vfd, tfd;
	uint64_t deadline_ns; /* for RS_HELLO and RS_CONNECTING */
	char what[64];        /* "127.0.0.1:8080" */
	/* host -> guest: frames as read from vsock */
	uint8_t down[RELAY_BUF];
	size_t dh, dt;
	uint32_t frame_left; /* payload bytes of the current DATA frame still to write */
	/* guest -> host: frames to send on vsock */
	uint8_t up[RELAY_BUF];
	size_t uh, ut;
	bool host_closed; /* vsock read gave EOF */
	bool host_eof;    /* EOF frame received: TCP shut for writing */
	bool guest_eof;   /* TCP read gave EOF */
	bool eof_queued;  /* our EOF frame is in `up` (or sent) */
	uint32_t vev, tev;
};

static struct relay relays[MAX_RELAYS];
static uint32_t relay_gen_seq;
static int listen_fd = -1;

int relay_listen(struct err *e)
{
	int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return err_sys(e, "socket AF_VSOCK for relays");
	struct sockaddr_vm sa = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = RELAY_PORT};
	if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(fd, 64) < 0 ||
	    ev_add(fd, EPOLLIN, tag_make(TAG_RELAY_LISTEN, 0, 0)) < 0) {
		err_sys(e, "listen on vsock port %d (relays)", RELAY_PORT);
		close(fd);
		return -1;
	}
	listen_fd = fd;
	return 0;
}

/* An fd with nothing to wait for leaves the epoll set: a hung-up socket would
 * otherwise report EPOLLHUP on every turn of the loop. UINT32_MAX: not in it. */
static void watch(struct relay *r, int fd, uint32_t *cur, uint32_t want, uint64_t tag)
{
	if (want == *cur || (want == 0 && *cur == UINT32_MAX))
		return;
	int rc;
	if (want == 0) {
		ev_del(fd);
		rc = 0;
		want = UINT32_MAX;
	} else if (*cur == UINT32_MAX) {
		rc = ev_add(fd, want, tag);
	} else {
		rc = ev_mod(fd, want, tag);
	}
	if (rc < 0)
		alog("relay %s: epoll: %s", r->what, strerror(errno));
	*cur = want;
}

static void set_events(struct relay *r, uint32_t idx)
{
	uint32_t v = 0, t = 0;
	if (!r->host_closed && r->dt < RELAY_BUF)
		v |= EPOLLIN;
	if (r->uh < r->ut)
		v |= EPOLLOUT;
	if (r->st == RS_CONNECTING)
		t = EPOLLOUT;
	else if (r->st == RS_OPEN) {
		if (!r->guest_eof && RELAY_BUF - r->ut > 4)
			t |= EPOLLIN;
		if (r->frame_left && r->dh < r->dt)
			t |= EPOLLOUT;
	}
	watch(r, r->vfd, &r->vev, v, tag_make(TAG_RELAY_VSOCK, idx, r->gen));
	if (r->tfd >= 0)
		watch(r, r->tfd, &r->tev, t, tag_make(TAG_RELAY_TCP, idx, r->gen));
}

static void relay_free(struct relay *r, bool reset)
{
	ev_del(r->vfd);
	close(r->vfd);
	if (r->tfd >= 0) {
		if (reset) {
			/* The other side broke off: the guest's peer sees a reset, not an EOF. */
			struct linger l = {.l_onoff = 1, .l_linger = 0};
			setsockopt(r->tfd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
		}
		ev_del(r->tfd);
		close(r->tfd);
	}
	r->used = false;
}

static void relay_abort(struct relay *r, const char *why)
{
	alog("relay %s: aborted: %s", r->what, why);
	relay_free(r, true);
}

/* The reply to the open request, then (on error) the stream goes. */
static void reply(struct relay *r, int code, const char *msg)
{
	cloudhv_agent_v1_RelayOpenResponse resp = cloudhv_agent_v1_RelayOpenResponse_init_zero;
	resp.code = (uint32_t)code;
	snprintf(resp.message, sizeof resp.message, "%s", msg);
	uint8_t buf[4 + cloudhv_agent_v1_RelayOpenResponse_size];
	pb_ostream_t os = pb_ostream_from_buffer(buf + 4, sizeof buf - 4);
	if (!pb_encode(&os, cloudhv_agent_v1_RelayOpenResponse_fields, &resp)) {
		relay_abort(r, "encode the open reply");
		return;
	}
	uint32_t n = (uint32_t)os.bytes_written;
	buf[0] = (uint8_t)(n >> 24);
	buf[1] = (uint8_t)(n >> 16);
	buf[2] = (uint8_t)(n >> 8);
	buf[3] = (uint8_t)n;
	memcpy(r->up + r->ut, buf, 4 + n); /* `up` is empty before the reply */
	r->ut += 4 + n;
	if (code) {
		/* A few bytes on a fresh stream: the send does not block. */
		if (send(r->vfd, r->up, r->ut, MSG_DONTWAIT | MSG_NOSIGNAL) < 0)
			alog("relay %s: send the refusal: %s", r->what, strerror(errno));
		alog("relay %s: %s", r->what, msg);
		relay_free(r, false);
	}
}

static void connected(struct relay *r, uint32_t idx)
{
	r->st = RS_OPEN;
	r->deadline_ns = 0;
	reply(r, C_OK, "");
	set_events(r, idx);
}

static void connect_failed(struct relay *r, int errnum)
{
	char msg[128];
	snprintf(msg, sizeof msg, "connect %s: %s", r->what, strerror(errnum));
	reply(r, errnum == ECONNREFUSED ? C_UNAVAILABLE : code_from_errno(errnum), msg);
}

static void open_relay(struct relay *r, uint32_t idx)
{
	if (r->dt < 4)
		return;
	uint32_t n = (uint32_t)r->down[0] << 24 | (uint32_t)r->down[1] << 16 | (uint32_t)r->down[2] << 8 | r->down[3];
	if (n > HELLO_MAX) {
		relay_abort(r, "open request too long");
		return;
	}
	if (r->dt < 4 + n)
		return;
	cloudhv_agent_v1_RelayOpenRequest req = cloudhv_agent_v1_RelayOpenRequest_init_zero;
	pb_istream_t is = pb_istream_from_buffer(r->down + 4, n);
	if (!pb_decode(&is, cloudhv_agent_v1_RelayOpenRequest_fields, &req)) {
		relay_abort(r, "undecodable open request");
		return;
	}
	/* Anything after the request is already frames. */
	memmove(r->down, r->down + 4 + n, r->dt - 4 - n);
	r->dt -= 4 + n;
	r->dh = 0;
	snprintf(r->what, sizeof r->what, "%s:%u", req.ipv6 ? "[::1]" : "127.0.0.1", (unsigned)req.port);
	if (req.port == 0 || req.port > 65535) {
		reply(r, C_INVALID_ARGUMENT, "port out of range: want 1 to 65535");
		return;
	}
	struct sockaddr_storage ss;
	socklen_t len;
	memset(&ss, 0, sizeof ss);
	if (req.ipv6) {
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
		a->sin6_family = AF_INET6;
		a->sin6_port = htons((uint16_t)req.port);
		a->sin6_addr = in6addr_loopback;
		len = sizeof *a;
	} else {
		struct sockaddr_in *a = (struct sockaddr_in *)&ss;
		a->sin_family = AF_INET;
		a->sin_port = htons((uint16_t)req.port);
		a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		len = sizeof *a;
	}
	r->tfd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (r->tfd < 0) {
		connect_failed(r, errno);
		return;
	}
	r->tev = UINT32_MAX; /* not in the epoll set yet */
	if (connect(r->tfd, (struct sockaddr *)&ss, len) == 0) {
		connected(r, idx);
		return;
	}
	if (errno != EINPROGRESS) {
		int errnum = errno;
		close(r->tfd);
		r->tfd = -1;
		connect_failed(r, errnum);
		return;
	}
	r->st = RS_CONNECTING;
	r->deadline_ns = now_ns() + OPEN_TIMEOUT_NS;
	set_events(r, idx);
}

void relay_on_listen(int fd)
{
	(void)fd;
	for (;;) {
		struct sockaddr_storage sa;
		socklen_t len = sizeof sa;
		memset(&sa, 0, sizeof sa);
		int cfd = accept4(listen_fd, (struct sockaddr *)&sa, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (cfd < 0) {
			if (errno != EAGAIN && errno != EINTR)
				alog("accept (relays): %s", strerror(errno));
			return;
		}
		if (!vsock_peer_allowed(cfd, &sa, len, "relays"))
			continue;
		uint32_t i;
		for (i = 0; i < MAX_RELAYS && relays[i].used; i++)
			;
		if (i == MAX_RELAYS) {
			alog("accept (relays): all %d relays in use: refusing a connection", MAX_RELAYS);
			close(cfd);
			continue;
		}
		struct relay *r = &relays[i];
		uint32_t gen = ++relay_gen_seq & 0xffffffu;
		/* Only the fields: the buffers are overwritten before they are read. */
		r->used = true;
		r->gen = gen;
		r->st = RS_HELLO;
		r->vfd = cfd;
		r->tfd = -1;
		r->deadline_ns = now_ns() + OPEN_TIMEOUT_NS;
		snprintf(r->what, sizeof r->what, "(opening)");
		r->dh = r->dt = r->uh = r->ut = 0;
		r->frame_left = 0;
		r->host_closed = r->host_eof = r->guest_eof = r->eof_queued = false;
		r->vev = EPOLLIN;
		r->tev = UINT32_MAX;
		if (ev_add(cfd, EPOLLIN, tag_make(TAG_RELAY_VSOCK, i, gen)) < 0) {
			alog("accept (relays): epoll add: %s", strerror(errno));
			close(cfd);
			r->used = false;
		}
	}
}

/* Moves bytes both ways until nothing moves; false once the relay is gone. */
static bool pump(struct relay *r)
{
	for (bool moved = true; moved;) {
		moved = false;
		/* vsock -> down */
		if (!r->host_closed) {
			if (r->dh == r->dt)
				r->dh = r->dt = 0;
			else if (r->dh && RELAY_BUF - r->dt < RELAY_FRAME + 4) {
				memmove(r->down, r->down + r->dh, r->dt - r->dh);
				r->dt -= r->dh;
				r->dh = 0;
			}
			if (r->dt < RELAY_BUF) {
				ssize_t n = read(r->vfd, r->down + r->dt, RELAY_BUF - r->dt);
				if (n > 0) {
					r->dt += (size_t)n;
					moved = true;
				} else if (n == 0) {
					r->host_closed = true;
				} else if (errno != EAGAIN && errno != EINTR) {
					relay_abort(r, strerror(errno));
					return false;
				}
			}
		}
		/* down -> TCP */
		while (r->dh < r->dt) {
			if (r->frame_left) {
				size_t want = r->dt - r->dh < r->frame_left ? r->dt - r->dh : r->frame_left;
				ssize_t n = send(r->tfd, r->down + r->dh, want, MSG_DONTWAIT | MSG_NOSIGNAL);
				if (n < 0) {
					if (errno == EAGAIN || errno == EINTR)
						break;
					relay_abort(r, strerror(errno));
					return false;
				}
				r->dh += (size_t)n;
				r->frame_left -= (uint32_t)n;
				moved = true;
				continue;
			}
			if (r->dt - r->dh < 4)
				break;
			const uint8_t *h = r->down + r->dh;
			uint32_t len = (uint32_t)h[2] << 8 | h[3];
			r->dh += 4;
			moved = true;
			if (h[0] == T_DATA && len > 0 && len <= RELAY_FRAME && !r->host_eof) {
				r->frame_left = len;
			} else if (h[0] == T_EOF && len == 0 && !r->host_eof) {
				r->host_eof = true;
				if (shutdown(r->tfd, SHUT_WR) < 0 && errno != ENOTCONN) {
					relay_abort(r, strerror(errno));
					return false;
				}
			} else {
				relay_abort(r, "bad frame from the host");
				return false;
			}
		}
		/* TCP -> up */
		if (r->uh == r->ut)
			r->uh = r->ut = 0;
		else if (r->uh && RELAY_BUF - r->ut < RELAY_FRAME + 4) {
			memmove(r->up, r->up + r->uh, r->ut - r->uh);
			r->ut -= r->uh;
			r->uh = 0;
		}
		if (!r->guest_eof && RELAY_BUF - r->ut > 4) {
			size_t room = RELAY_BUF - r->ut - 4;
			if (room > RELAY_FRAME)
				room = RELAY_FRAME;
			ssize_t n = recv(r->tfd, r->up + r->ut + 4, room, MSG_DONTWAIT);
			if (n > 0) {
				uint8_t *h = r->up + r->ut;
				h[0] = T_DATA;
				h[1] = 0;
				h[2] = (uint8_t)(n >> 8);
				h[3] = (uint8_t)n;
				r->ut += 4 + (size_t)n;
				moved = true;
			} else if (n == 0) {
				r->guest_eof = true;
				moved = true;
			} else if (errno != EAGAIN && errno != EINTR) {
				relay_abort(r, strerror(errno));
				return false;
			}
		}
		if (r->guest_eof && !r->eof_queued && RELAY_BUF - r->ut >= 4) {
			uint8_t *h = r->up + r->ut;
			h[0] = T_EOF;
			h[1] = h[2] = h[3] = 0;
			r->ut += 4;
			r->eof_queued = true;
			moved = true;
		}
		/* up -> vsock */
		if (r->uh < r->ut) {
			ssize_t n = send(r->vfd, r->up + r->uh, r->ut - r->uh, MSG_DONTWAIT | MSG_NOSIGNAL);
			if (n > 0) {
				r->uh += (size_t)n;
				moved = true;
			} else if (n < 0 && errno != EAGAIN && errno != EINTR) {
				relay_abort(r, strerror(errno));
				return false;
			}
		}
	}
	bool sent_all = r->eof_queued && r->uh == r->ut;
	bool got_all = r->host_eof && r->frame_left == 0 && r->dh == r->dt;
	if (sent_all && got_all) {
		relay_free(r, false);
		return false;
	}
	if (r->host_closed) {
		/* The shim closes only after both EOFs crossed: anything else is an abort. */
		relay_abort(r, got_all ? "the host closed the stream before our EOF"
				       : "the host closed the stream without an EOF");
		return false;
	}
	return true;
}

void relay_on_event(int kind, uint32_t idx, uint32_t gen, uint32_t events)
{
	(void)events;
	if (kind == TAG_RELAY_LISTEN) {
		relay_on_listen(listen_fd);
		return;
	}
	if (idx >= MAX_RELAYS || !relays[idx].used || relays[idx].gen != gen)
		return;
	struct relay *r = &relays[idx];
	if (r->st == RS_HELLO) {
		ssize_t n = read(r->vfd, r->down + r->dt, 4 + HELLO_MAX - r->dt);
		if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
			relay_abort(r, n == 0 ? "closed before the open request" : strerror(errno));
			return;
		}
		if (n > 0) {
			r->dt += (size_t)n;
			open_relay(r, idx);
		}
		return;
	}
	if (r->st == RS_CONNECTING) {
		if (kind != TAG_RELAY_TCP)
			return; /* the host's bytes wait in the socket */
		int soerr = 0;
		socklen_t len = sizeof soerr;
		if (getsockopt(r->tfd, SOL_SOCKET, SO_ERROR, &soerr, &len) < 0)
			soerr = errno;
		if (soerr) {
			ev_del(r->tfd);
			close(r->tfd);
			r->tfd = -1;
			connect_failed(r, soerr);
			return;
		}
		connected(r, idx);
		if (!r->used)
			return;
	}
	if (pump(r))
		set_events(r, idx);
}

uint64_t relay_housekeeping(void)
{
	uint64_t now = now_ns(), next = 0;
	for (uint32_t i = 0; i < MAX_RELAYS; i++) {
		struct relay *r = &relays[i];
		if (!r->used || !r->deadline_ns)
			continue;
		if (now >= r->deadline_ns) {
			if (r->st == RS_CONNECTING) {
				ev_del(r->tfd);
				close(r->tfd);
				r->tfd = -1;
				connect_failed(r, ETIMEDOUT);
			} else {
				relay_abort(r, "no open request within 10 s");
			}
			continue;
		}
		if (!next || r->deadline_ns < next)
			next = r->deadline_ns;
	}
	return next;
}
