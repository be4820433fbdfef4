/* rtnetlink over a raw NETLINK_ROUTE socket: the few link, address and route
 * operations the pod network needs, each one request and its ack. No `ip`
 * binary in the guest: the rootfs stays agent + crun. Requests are built in a
 * fixed buffer; running out of room is an error, never an overflow. */
#ifndef AGENT_NETLINK_H
#define AGENT_NETLINK_H

#include <stdbool.h>
#include <stdint.h>

#include "err.h"

#define NL_NAME_MAX 16 /* IFNAMSIZ */

struct nl_addr {
	int family; /* AF_INET or AF_INET6 */
	uint8_t bytes[16];
	unsigned prefix;
};

struct nl_link {
	int index;
	char name[NL_NAME_MAX];
	unsigned mtu;
	unsigned flags; /* IFF_* */
};

/* Parses "10.0.0.1" or "fd00::1" (family 0: either). */
int nl_parse_addr(const char *text, int family, struct nl_addr *out, struct err *e);
/* Parses "aa:bb:cc:dd:ee:ff". */
int nl_parse_mac(const char *text, uint8_t mac[6], struct err *e);

/* Finds the link with this MAC: 1 found, 0 none, -1 error. */
int nl_link_by_mac(const uint8_t mac[6], struct nl_link *out, struct err *e);
/* Finds the link with this name: 1 found, 0 none, -1 error. */
int nl_link_by_name(const char *name, struct nl_link *out, struct err *e);
/* Sets name (NULL: unchanged), MTU (0: unchanged) and up/down. */
int nl_link_set(int index, const char *name, unsigned mtu, bool up, struct err *e);
/* Removes every IPv4 address and every IPv6 one but link-local, of one link. */
int nl_addr_flush(int index, struct err *e);
int nl_addr_add(int index, const struct nl_addr *a, struct err *e);

struct nl_route {
	struct nl_addr dst; /* prefix 0: default */
	bool has_gateway;
	struct nl_addr gateway;
	bool has_source;
	struct nl_addr source;
	int oif; /* 0: none */
	unsigned metric;
	unsigned scope;
};
/* Adds (or replaces) a route in the main table. */
int nl_route_add(const struct nl_route *r, const char *what, struct err *e);

#endif
