#include "netlink.h"

#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <linux/if_addr.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>

#define REQ_CAP 1024
#define RECV_CAP 32768
#define MAX_FLUSH 64

struct req {
	struct nlmsghdr *h;
	uint8_t buf[REQ_CAP] __attribute__((aligned(NLMSG_ALIGNTO)));
	bool overflow;
};

static uint8_t recv_buf[RECV_CAP] __attribute__((aligned(NLMSG_ALIGNTO)));
static uint32_t seq_counter;

static void *req_init(struct req *r, uint16_t type, uint16_t flags, size_t body)
{
	memset(r->buf, 0, sizeof r->buf);
	r->overflow = false;
	r->h = (struct nlmsghdr *)r->buf;
	r->h->nlmsg_len = NLMSG_LENGTH(body);
	r->h->nlmsg_type = type;
	r->h->nlmsg_flags = NLM_F_REQUEST | flags;
	r->h->nlmsg_seq = ++seq_counter;
	return NLMSG_DATA(r->h);
}

static void req_attr(struct req *r, uint16_t type, const void *data, size_t len)
{
	size_t at = NLMSG_ALIGN(r->h->nlmsg_len);
	size_t need = RTA_SPACE(len);
	if (at + need > sizeof r->buf) {
		r->overflow = true;
		return;
	}
	struct rtattr *a = (struct rtattr *)(r->buf + at);
	a->rta_type = type;
	a->rta_len = (unsigned short)RTA_LENGTH(len);
	memcpy(RTA_DATA(a), data, len);
	r->h->nlmsg_len = (uint32_t)(at + need);
}

static void req_u32(struct req *r, uint16_t type, uint32_t v)
{
	req_attr(r, type, &v, sizeof v);
}

static int nl_socket(struct err *e)
{
	int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
	if (fd < 0)
		return err_sys(e, "socket NETLINK_ROUTE");
	/* The kernel answers at once; a bound wait keeps PID 1 from hanging on a bug. */
	struct timeval tv = {.tv_sec = 2};
	if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0) {
		err_sys(e, "setsockopt SO_RCVTIMEO on netlink");
		close(fd);
		return -1;
	}
	struct sockaddr_nl sa = {.nl_family = AF_NETLINK};
	if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
		err_sys(e, "bind netlink");
		close(fd);
		return -1;
	}
	return fd;
}

static int nl_send(int fd, struct req *r, const char *what, struct err *e)
{
	if (r->overflow)
		return err_set(e, C_INTERNAL, "%s: netlink request larger than %d bytes", what, REQ_CAP);
	struct sockaddr_nl sa = {.nl_family = AF_NETLINK};
	for (;;) {
		ssize_t n = sendto(fd, r->buf, r->h->nlmsg_len, 0, (struct sockaddr *)&sa, sizeof sa);
		if (n >= 0)
			return 0;
		if (errno != EINTR)
			return err_sys(e, "%s: netlink send", what);
	}
}

static ssize_t nl_recv(int fd, const char *what, struct err *e)
{
	for (;;) {
		ssize_t n = recv(fd, recv_buf, sizeof recv_buf, 0);
		if (n > 0)
			return n;
		if (n == 0)
			return err_set(e, C_INTERNAL, "%s: netlink socket closed", what);
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN)
			return err_set(e, C_DEADLINE_EXCEEDED, "%s: no netlink answer within 2 s", what);
		return err_sys(e, "%s: netlink receive", what);
	}
}

/* Sends a request that wants an ack and returns its result. */
static int nl_talk(struct req *r, const char *what, struct err *e)
{
	int fd = nl_socket(e);
	if (fd < 0)
		return -1;
	r->h->nlmsg_flags |= NLM_F_ACK;
	int rc = nl_send(fd, r, what, e);
	while (rc == 0) {
		ssize_t n = nl_recv(fd, what, e);
		if (n < 0) {
			rc = -1;
			break;
		}
		bool done = false;
		for (struct nlmsghdr *h = (struct nlmsghdr *)recv_buf; NLMSG_OK(h, (size_t)n);
		     h = NLMSG_NEXT(h, n)) {
			if (h->nlmsg_seq != r->h->nlmsg_seq || h->nlmsg_type != NLMSG_ERROR)
				continue;
			const struct nlmsgerr *ne = NLMSG_DATA(h);
			if (ne->error)
				rc = err_errno(e, -ne->error, "%s", what);
			done = true;
			break;
		}
		if (done)
			break;
	}
	close(fd);
	return rc;
}

/* Runs a dump, calling fn for each message of `type`; fn returns 1 to stop, -1 on error. */
typedef int (*dump_fn)(const struct nlmsghdr *h, void *arg, struct err *e);

static int nl_dump(struct req *r, uint16_t type, dump_fn fn, void *arg, const char *what,
		   struct err *e)
{
	int fd = nl_socket(e);
	if (fd < 0)
		return -1;
	int rc = nl_send(fd, r, what, e);
	bool done = rc < 0;
	int result = 0;
	while (!done) {
		ssize_t n = nl_recv(fd, what, e);
		if (n < 0) {
			rc = -1;
			break;
		}
		for (struct nlmsghdr *h = (struct nlmsghdr *)recv_buf; NLMSG_OK(h, (size_t)n);
		     h = NLMSG_NEXT(h, n)) {
			if (h->nlmsg_seq != r->h->nlmsg_seq)
				continue;
			if (h->nlmsg_type == NLMSG_DONE) {
				done = true;
				break;
			}
			if (h->nlmsg_type == NLMSG_ERROR) {
				const struct nlmsgerr *ne = NLMSG_DATA(h);
				rc = err_errno(e, -ne->error, "%s", what);
				done = true;
				break;
			}
			/* After fn asked to stop, the rest of the dump is read and dropped. */
			if (h->nlmsg_type != type || result)
				continue;
			int got = fn(h, arg, e);
			if (got < 0) {
				rc = -1;
				result = -1;
			} else if (got > 0) {
				result = 1;
			}
		}
	}
	close(fd);
	return rc < 0 ? -1 : result;
}

int nl_parse_addr(const char *text, int family, struct nl_addr *out, struct err *e)
{
	memset(out, 0, sizeof *out);
	if ((family == 0 || family == AF_INET) && inet_pton(AF_INET, text, out->bytes) == 1) {
		out->family = AF_INET;
		out->prefix = 32;
		return 0;
	}
	if ((family == 0 || family == AF_INET6) && inet_pton(AF_INET6, text, out->bytes) == 1) {
		out->family = AF_INET6;
		out->prefix = 128;
		return 0;
	}
	return err_set(e, C_INVALID_ARGUMENT, "address \"%s\": not an IP%s address", text,
		       family == AF_INET ? "v4" : family == AF_INET6 ? "v6" : "v4 or IPv6");
}

int nl_parse_mac(const char *text, uint8_t mac[6], struct err *e)
{
	unsigned v[6];
	char tail;
	if (strlen(text) != 17 ||
	    sscanf(text, "%2x:%2x:%2x:%2x:%2x:%2x%c", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &tail) != 6)
		return err_set(e, C_INVALID_ARGUMENT, "MAC \"%s\": want six hex bytes like 02:42:0a:58:00:05",
			       text);
	for (int i = 0; i < 6; i++)
		mac[i] = (uint8_t)v[i];
	return 0;
}

struct link_query {
	const uint8_t *mac;
	const char *name;
	struct nl_link *out;
};

static int link_match(const struct nlmsghdr *h, void *arg, struct err *e)
{
	(void)e;
	struct link_query *q = arg;
	const struct ifinfomsg *ifi = NLMSG_DATA(h);
	int len = (int)(h->nlmsg_len - NLMSG_LENGTH(sizeof *ifi));
	const char *name = NULL;
	const uint8_t *mac = NULL;
	unsigned mtu = 0;
	for (const struct rtattr *a = IFLA_RTA(ifi); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
		if (a->rta_type == IFLA_IFNAME)
			name = RTA_DATA(a);
		else if (a->rta_type == IFLA_ADDRESS && RTA_PAYLOAD(a) == 6)
			mac = RTA_DATA(a);
		else if (a->rta_type == IFLA_MTU && RTA_PAYLOAD(a) == 4)
			memcpy(&mtu, RTA_DATA(a), 4);
	}
	if (q->mac && (!mac || memcmp(mac, q->mac, 6)))
		return 0;
	if (q->name && (!name || strcmp(name, q->name)))
		return 0;
	q->out->index = ifi->ifi_index;
	q->out->flags = ifi->ifi_flags;
	q->out->mtu = mtu;
	snprintf(q->out->name, sizeof q->out->name, "%s", name ? name : "");
	return 1;
}

static int link_find(struct link_query *q, const char *what, struct err *e)
{
	static struct req r;
	struct ifinfomsg *ifi = req_init(&r, RTM_GETLINK, NLM_F_DUMP, sizeof *ifi);
	ifi->ifi_family = AF_UNSPEC;
	return nl_dump(&r, RTM_NEWLINK, link_match, q, what, e);
}

int nl_link_by_mac(const uint8_t mac[6], struct nl_link *out, struct err *e)
{
	struct link_query q = {.mac = mac, .out = out};
	return link_find(&q, "list links", e);
}

int nl_link_by_name(const char *name, struct nl_link *out, struct err *e)
{
	struct link_query q = {.name = name, .out = out};
	return link_find(&q, "list links", e);
}

int nl_link_set(int index, const char *name, unsigned mtu, bool up, struct err *e)
{
	static struct req r;
	struct ifinfomsg *ifi = req_init(&r, RTM_NEWLINK, 0, sizeof *ifi);
	ifi->ifi_family = AF_UNSPEC;
	ifi->ifi_index = index;
	ifi->ifi_change = IFF_UP;
	ifi->ifi_flags = up ? IFF_UP : 0;
	if (name)
		req_attr(&r, IFLA_IFNAME, name, strlen(name) + 1);
	if (mtu)
		req_u32(&r, IFLA_MTU, mtu);
	char what[96];
	snprintf(what, sizeof what, "set link %d%s%s mtu %u %s", index, name ? " name " : "", name ? name : "",
		 mtu, up ? "up" : "down");
	return nl_talk(&r, what, e);
}

struct flush_list {
	int index;
	int n;
	struct {
		int family;
		unsigned prefix;
		uint8_t local[16];
	} a[MAX_FLUSH];
};

static int addr_collect(const struct nlmsghdr *h, void *arg, struct err *e)
{
	struct flush_list *l = arg;
	const struct ifaddrmsg *ifa = NLMSG_DATA(h);
	if ((int)ifa->ifa_index != l->index)
		return 0;
	if (ifa->ifa_family == AF_INET6 && ifa->ifa_scope == RT_SCOPE_LINK)
		return 0; /* the kernel's fe80:: address: the NIC's own */
	if (ifa->ifa_family != AF_INET && ifa->ifa_family != AF_INET6)
		return 0;
	int len = (int)(h->nlmsg_len - NLMSG_LENGTH(sizeof *ifa));
	const struct rtattr *local = NULL, *address = NULL;
	for (const struct rtattr *a = IFA_RTA(ifa); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
		if (a->rta_type == IFA_LOCAL)
			local = a;
		else if (a->rta_type == IFA_ADDRESS)
			address = a;
	}
	const struct rtattr *use = local ? local : address;
	size_t size = ifa->ifa_family == AF_INET ? 4 : 16;
	if (!use || RTA_PAYLOAD(use) != size)
		return 0;
	if (l->n == MAX_FLUSH)
		return err_set(e, C_RESOURCE_EXHAUSTED, "link %d has more than %d addresses", l->index, MAX_FLUSH);
	l->a[l->n].family = ifa->ifa_family;
	l->a[l->n].prefix = ifa->ifa_prefixlen;
	memcpy(l->a[l->n].local, RTA_DATA(use), size);
	l->n++;
	return 0;
}

int nl_addr_flush(int index, struct err *e)
{
	static struct req r;
	static struct flush_list l;
	memset(&l, 0, sizeof l);
	l.index = index;
	struct ifaddrmsg *ifa = req_init(&r, RTM_GETADDR, NLM_F_DUMP, sizeof *ifa);
	ifa->ifa_family = AF_UNSPEC;
	if (nl_dump(&r, RTM_NEWADDR, addr_collect, &l, "list addresses", e) < 0)
		return -1;
	for (int i = 0; i < l.n; i++) {
		ifa = req_init(&r, RTM_DELADDR, 0, sizeof *ifa);
		ifa->ifa_family = (uint8_t)l.a[i].family;
		ifa->ifa_prefixlen = (uint8_t)l.a[i].prefix;
		ifa->ifa_index = (unsigned)index;
		req_attr(&r, IFA_LOCAL, l.a[i].local, l.a[i].family == AF_INET ? 4 : 16);
		char text[INET6_ADDRSTRLEN], what[96];
		inet_ntop(l.a[i].family, l.a[i].local, text, sizeof text);
		snprintf(what, sizeof what, "remove address %s/%u from link %d", text, l.a[i].prefix, index);
		if (nl_talk(&r, what, e) < 0 && e->errnum != EADDRNOTAVAIL)
			return -1;
	}
	return 0;
}

int nl_addr_add(int index, const struct nl_addr *a, struct err *e)
{
	static struct req r;
	struct ifaddrmsg *ifa = req_init(&r, RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, sizeof *ifa);
	size_t size = a->family == AF_INET ? 4 : 16;
	ifa->ifa_family = (uint8_t)a->family;
	ifa->ifa_prefixlen = (uint8_t)a->prefix;
	ifa->ifa_index = (unsigned)index;
	ifa->ifa_scope = RT_SCOPE_UNIVERSE;
	req_attr(&r, IFA_LOCAL, a->bytes, size);
	req_attr(&r, IFA_ADDRESS, a->bytes, size);
	if (a->family == AF_INET && a->prefix < 31) {
		uint8_t brd[4];
		uint32_t host = a->prefix ? 0xffffffffu >> a->prefix : 0xffffffffu;
		uint32_t net;
		memcpy(&net, a->bytes, 4);
		net = htonl(ntohl(net) | host);
		memcpy(brd, &net, 4);
		req_attr(&r, IFA_BROADCAST, brd, 4);
	}
	if (a->family == AF_INET6)
		req_u32(&r, IFA_FLAGS, IFA_F_NODAD);
	char text[INET6_ADDRSTRLEN], what[96];
	inet_ntop(a->family, a->bytes, text, sizeof text);
	snprintf(what, sizeof what, "add address %s/%u to link %d", text, a->prefix, index);
	return nl_talk(&r, what, e);
}

int nl_route_add(const struct nl_route *rt, const char *what, struct err *e)
{
	static struct req r;
	struct rtmsg *m = req_init(&r, RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, sizeof *m);
	size_t size = rt->dst.family == AF_INET ? 4 : 16;
	m->rtm_family = (uint8_t)rt->dst.family;
	m->rtm_dst_len = (uint8_t)rt->dst.prefix;
	m->rtm_table = RT_TABLE_MAIN;
	m->rtm_protocol = RTPROT_BOOT;
	m->rtm_scope = (uint8_t)rt->scope;
	m->rtm_type = RTN_UNICAST;
	if (rt->dst.prefix)
		req_attr(&r, RTA_DST, rt->dst.bytes, size);
	if (rt->has_gateway)
		req_attr(&r, RTA_GATEWAY, rt->gateway.bytes, size);
	if (rt->has_source)
		req_attr(&r, RTA_PREFSRC, rt->source.bytes, size);
	if (rt->oif)
		req_u32(&r, RTA_OIF, (uint32_t)rt->oif);
	if (rt->metric)
		req_u32(&r, RTA_PRIORITY, rt->metric);
	return nl_talk(&r, what, e);
}
