/* UpdateInterface / UpdateRoutes: the pod's NICs, found by the MAC the shim
 * gave them when it hot-plugged them (waiting for the hotplug up to the
 * request's timeout), configured over rtnetlink (netlink.c). */
#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent.h"
#include "log.h"
#include "netlink.h"
#include "rpc.h"

#define HOTPLUG_POLL_NS (10 * 1000000ull)

static int check_ifname(const char *name, struct err *e)
{
	size_t n = strlen(name);
	if (n == 0 || n >= IFNAMSIZ || !strcmp(name, ".") || !strcmp(name, ".."))
		return err_set(e, C_INVALID_ARGUMENT, "interface name \"%s\": want 1 to %d characters", name,
			       IFNAMSIZ - 1);
	for (const char *p = name; *p; p++)
		if (*p == '/' || *p == ':' || *p <= ' ' || *p == 0x7f)
			return err_set(e, C_INVALID_ARGUMENT,
				       "interface name \"%s\": no '/', ':', spaces or control characters", name);
	return 0;
}

static int configure(struct call *c, const struct nl_link *link, struct err *e)
{
	const char *mac = c->u.net.mac_text;
	const char *name = c->u.net.name[0] ? c->u.net.name : NULL;
	if (name && !strcmp(name, link->name))
		name = NULL;
	if (name) {
		/* The kernel renames only a link that is down. */
		if (link->flags & IFF_UP && nl_link_set(link->index, NULL, 0, false, e) < 0)
			return R_ERR;
		struct nl_link other;
		int taken = nl_link_by_name(name, &other, e);
		if (taken < 0)
			return R_ERR;
		if (taken)
			return err_set(e, C_ALREADY_EXISTS, "rename NIC %s (%s) to %s: another link has that name",
				       mac, link->name, name);
	}
	if (nl_link_set(link->index, name, c->u.net.mtu, false, e) < 0)
		return R_ERR;
	if (nl_addr_flush(link->index, e) < 0)
		return R_ERR;
	for (int i = 0; i < c->u.net.naddrs; i++)
		if (nl_addr_add(link->index, &c->u.net.addrs[i], e) < 0)
			return R_ERR;
	if (nl_link_set(link->index, NULL, 0, true, e) < 0)
		return R_ERR;
	alog("NIC %s: %s -> %s, mtu %u, %d addresses, up", mac, link->name, name ? name : link->name,
	     c->u.net.mtu ? c->u.net.mtu : link->mtu, c->u.net.naddrs);
	return R_DONE;
}

static int interface_poll(struct call *c, void *vresp, struct err *e)
{
	(void)vresp;
	if (c->wake_ns && now_ns() < c->wake_ns)
		return R_PARK;
	struct nl_link link;
	int found = nl_link_by_mac(c->u.net.mac, &link, e);
	if (found < 0)
		return R_ERR;
	if (!found) {
		uint64_t now = now_ns();
		if (now >= c->u.net.until_ns)
			return err_set(e, C_NOT_FOUND, "no NIC with MAC %s", c->u.net.mac_text);
		c->wake_ns = now + HOTPLUG_POLL_NS;
		return R_PARK;
	}
	return configure(c, &link, e);
}

int h_update_interface(struct call *c, const void *vreq, void *vresp, struct err *e)
{
	const PB(UpdateInterfaceRequest) *r = vreq;
	strfmt(c->ids, sizeof c->ids, " mac=%s name=%s addresses=%u", r->mac, r->name,
	       (unsigned)r->addresses_count);
	if (nl_parse_mac(r->mac, c->u.net.mac, e) < 0)
		return R_ERR;
	if (r->name[0] && check_ifname(r->name, e) < 0)
		return R_ERR;
	if (r->mtu && (r->mtu < 68 || r->mtu > 65535))
		return err_set(e, C_INVALID_ARGUMENT, "MTU %u: want 68 to 65535", (unsigned)r->mtu);
	_Static_assert(sizeof r->addresses / sizeof r->addresses[0] <= sizeof c->u.net.addrs / sizeof c->u.net.addrs[0],
		       "every address of a request fits the parked call");
	for (pb_size_t i = 0; i < r->addresses_count; i++) {
		struct nl_addr *a = &c->u.net.addrs[i];
		if (nl_parse_addr(r->addresses[i].address, 0, a, e) < 0)
			return R_ERR;
		if (r->addresses[i].prefix_len > a->prefix)
			return err_set(e, C_INVALID_ARGUMENT, "address %s/%u: prefix longer than %u",
				       r->addresses[i].address, (unsigned)r->addresses[i].prefix_len, a->prefix);
		a->prefix = r->addresses[i].prefix_len;
	}
	snprintf(c->u.net.mac_text, sizeof c->u.net.mac_text, "%s", r->mac);
	snprintf(c->u.net.name, sizeof c->u.net.name, "%s", r->name);
	c->u.net.mtu = r->mtu;
	c->u.net.naddrs = (int)r->addresses_count;
	c->u.net.until_ns = now_ns() + (uint64_t)r->timeout_ms * 1000000ull;
	c->poll = interface_poll;
	return interface_poll(c, vresp, e);
}

/* "", "default" or a CIDR, in the family of `hint` (0: any). */
static int parse_destination(const char *text, int hint, struct nl_addr *out, struct err *e)
{
	if (!text[0] || !strcmp(text, "default")) {
		memset(out, 0, sizeof *out);
		out->family = hint ? hint : AF_INET;
		return 0;
	}
	char addr[64];
	const char *slash = strchr(text, '/');
	size_t n = slash ? (size_t)(slash - text) : strlen(text);
	if (n >= sizeof addr)
		return err_set(e, C_INVALID_ARGUMENT, "route destination \"%s\": too long", text);
	memcpy(addr, text, n);
	addr[n] = 0;
	if (nl_parse_addr(addr, hint, out, e) < 0)
		return R_ERR;
	if (slash) {
		char *end;
		unsigned long prefix = strtoul(slash + 1, &end, 10);
		if (end == slash + 1 || *end || prefix > out->prefix)
			return err_set(e, C_INVALID_ARGUMENT, "route destination \"%s\": bad prefix length", text);
		out->prefix = (unsigned)prefix;
	}
	return 0;
}

int h_update_routes(struct call *c, const void *vreq, void *vresp, struct err *e)
{
	const PB(UpdateRoutesRequest) *r = vreq;
	(void)vresp;
	strfmt(c->ids, sizeof c->ids, " routes=%u", (unsigned)r->routes_count);
	for (pb_size_t i = 0; i < r->routes_count; i++) {
		const PB(Route) *in = &r->routes[i];
		char what[200];
		snprintf(what, sizeof what, "route %s via %s dev %s", in->destination[0] ? in->destination : "default",
			 in->gateway[0] ? in->gateway : "-", in->device[0] ? in->device : "-");
		struct nl_route rt;
		memset(&rt, 0, sizeof rt);
		int family = 0;
		if (in->gateway[0]) {
			if (nl_parse_addr(in->gateway, 0, &rt.gateway, e) < 0)
				return R_ERR;
			rt.has_gateway = true;
			family = rt.gateway.family;
		}
		if (parse_destination(in->destination, family, &rt.dst, e) < 0)
			return R_ERR;
		if (rt.has_gateway && rt.gateway.family != rt.dst.family)
			return err_set(e, C_INVALID_ARGUMENT, "%s: gateway and destination of different families", what);
		if (in->source[0]) {
			if (nl_parse_addr(in->source, rt.dst.family, &rt.source, e) < 0)
				return R_ERR;
			rt.has_source = true;
		}
		if (in->scope > 255)
			return err_set(e, C_INVALID_ARGUMENT, "%s: scope %u: want 0 to 255", what, (unsigned)in->scope);
		rt.scope = in->scope;
		rt.metric = in->metric;
		if (in->device[0]) {
			struct nl_link link;
			int found = nl_link_by_name(in->device, &link, e);
			if (found < 0)
				return R_ERR;
			if (!found)
				return err_set(e, C_NOT_FOUND, "%s: no link %s", what, in->device);
			rt.oif = link.index;
		}
		if (nl_route_add(&rt, what, e) < 0)
			return R_ERR;
	}
	return R_DONE;
}
