/* A bounded JSON parser and writer: the document becomes a tree of nodes
 * (from a caller-supplied fixed pool) pointing into the source text, so
 * nothing is copied. Nodes can be deleted or given a new raw JSON value, and
 * the tree is written back out in order. Nesting depth is limited.
 *
 * Member names are compared decoded: a key written with escapes
 * ("selinux\u004cabel") is decoded into the document's key buffer, matches
 * "selinuxLabel", and is written back out re-escaped. A duplicate name in
 * one object is an error, so what the agent inspects is what crun reads. */
#ifndef AGENT_JSON_H
#define AGENT_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"

enum jtype { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ, J_RAW };

struct jnode {
	uint8_t type;
	uint8_t deleted;
	int32_t child, last, next; /* -1 when none */
	uint8_t kdecoded;          /* key points into the key buffer: quote it on output */
	const char *key;           /* member name (unescaped), or NULL */
	uint32_t klen;
	const char *val;           /* raw text of scalars (strings with quotes) and J_RAW */
	uint32_t vlen;
};

struct jdoc {
	struct jnode *n;
	int count, cap;
	char *kbuf;                /* decoded names of keys written with escapes */
	uint32_t kcap, kused;      /* kcap 0: such keys are refused */
};

#define JSON_MAX_DEPTH 64

/* Parses s into d (root is node 0). */
int json_parse(struct jdoc *d, const char *s, size_t len, struct err *e);
/* Member of an object, or -1. */
int json_get(const struct jdoc *d, int obj, const char *key);
/* Decodes a string node into buf; -1 if not a string, too long or has NUL. */
int json_str(const struct jdoc *d, int node, char *buf, size_t cap);
bool json_str_eq(const struct jdoc *d, int node, const char *s);
/* Reads a number node holding a non-negative integer; -1 otherwise. */
int json_u64(const struct jdoc *d, int node, uint64_t *v);
/* True if an array or object has a member that is not deleted. */
bool json_has_children(const struct jdoc *d, int node);
void json_del(struct jdoc *d, int node);
/* Replaces obj[key] with raw JSON text, or appends the member. key and raw
 * must stay valid until json_write. */
int json_set(struct jdoc *d, int obj, const char *key, const char *raw, struct err *e);
/* Appends raw JSON text to an array; raw must stay valid until json_write. */
int json_append(struct jdoc *d, int arr, const char *raw, struct err *e);
int json_write(const struct jdoc *d, char *out, size_t cap, size_t *len, struct err *e);
/* Writes s as a quoted JSON string; returns its length or 0 if it does not fit. */
size_t json_quote(const char *s, char *out, size_t cap);

#define JSON_EACH(d, parent, i) \
	for (int i = (d)->n[parent].child; i >= 0; i = (d)->n[i].next) \
		if (!(d)->n[i].deleted)

#endif
