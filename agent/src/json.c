#include "json.h"

#include <string.h>

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return c - 'A' + 10;
}

static unsigned hex4(const char *p)
{
	return (unsigned)(hexval(p[0]) << 12 | hexval(p[1]) << 8 | hexval(p[2]) << 4 | hexval(p[3]));
}

/* Decodes the inside of a scanned (valid) string literal; -1 if it does not
 * fit cap with its NUL, or holds a NUL. */
static int unescape(const char *p, const char *end, char *buf, size_t cap)
{
	size_t o = 0;
	if (cap == 0)
		return -1;
	while (p < end) {
		unsigned cp;
		if (*p != '\\') {
			cp = (unsigned char)*p++;
			if (o + 1 >= cap)
				return -1;
			buf[o++] = (char)cp;
			continue;
		}
		p++;
		char x = *p++;
		switch (x) {
		case 'b': cp = '\b'; break;
		case 'f': cp = '\f'; break;
		case 'n': cp = '\n'; break;
		case 'r': cp = '\r'; break;
		case 't': cp = '\t'; break;
		case 'u':
			cp = hex4(p);
			p += 4;
			if (cp >= 0xd800 && cp < 0xdc00 && end - p >= 6 && p[0] == '\\' && p[1] == 'u') {
				unsigned lo = hex4(p + 2);
				if (lo >= 0xdc00 && lo < 0xe000) {
					cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
					p += 6;
				}
			}
			break;
		default: cp = (unsigned char)x; break;
		}
		if (cp == 0)
			return -1;
		char u[4];
		size_t n;
		if (cp < 0x80) {
			u[0] = (char)cp; n = 1;
		} else if (cp < 0x800) {
			u[0] = (char)(0xc0 | cp >> 6); u[1] = (char)(0x80 | (cp & 0x3f)); n = 2;
		} else if (cp < 0x10000) {
			u[0] = (char)(0xe0 | cp >> 12); u[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
			u[2] = (char)(0x80 | (cp & 0x3f)); n = 3;
		} else {
			u[0] = (char)(0xf0 | cp >> 18); u[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
			u[2] = (char)(0x80 | ((cp >> 6) & 0x3f)); u[3] = (char)(0x80 | (cp & 0x3f)); n = 4;
		}
		if (o + n >= cap)
			return -1;
		memcpy(buf + o, u, n);
		o += n;
	}
	buf[o] = 0;
	return (int)o;
}

struct parser {
	struct jdoc *d;
	const char *s, *end, *p;
	struct err *e;
};

static int fail(struct parser *ps, const char *what)
{
	return err_set(ps->e, C_INVALID_ARGUMENT, "JSON: %s at offset %ld", what, (long)(ps->p - ps->s));
}

static void ws(struct parser *ps)
{
	while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r'))
		ps->p++;
}

static int new_node(struct parser *ps, int parent, enum jtype t)
{
	struct jdoc *d = ps->d;
	if (d->count >= d->cap)
		return err_set(ps->e, C_INVALID_ARGUMENT, "JSON: more than %d values", d->cap);
	int i = d->count++;
	struct jnode *n = &d->n[i];
	memset(n, 0, sizeof *n);
	n->type = (uint8_t)t;
	n->child = n->last = n->next = -1;
	if (parent >= 0) {
		struct jnode *pn = &d->n[parent];
		if (pn->last >= 0)
			d->n[pn->last].next = i;
		else
			pn->child = i;
		pn->last = i;
	}
	return i;
}

/* Scans a string starting at the opening quote; p ends after the closing one. */
static int scan_string(struct parser *ps)
{
	if (ps->p >= ps->end || *ps->p != '"')
		return fail(ps, "expected string");
	ps->p++;
	while (ps->p < ps->end) {
		unsigned char c = (unsigned char)*ps->p++;
		if (c == '"')
			return 0;
		if (c < 0x20)
			return fail(ps, "control character in string");
		if (c == '\\') {
			if (ps->p >= ps->end)
				break;
			char x = *ps->p++;
			if (x == 'u') {
				for (int k = 0; k < 4; k++, ps->p++) {
					if (ps->p >= ps->end || !strchr("0123456789abcdefABCDEF", *ps->p) || !*ps->p)
						return fail(ps, "bad \\u escape");
				}
			} else if (!strchr("\"\\/bfnrt", x) || !x) {
				return fail(ps, "bad escape");
			}
		}
	}
	return fail(ps, "unterminated string");
}

/* A key with escapes is decoded into the document's key buffer. */
static int decode_key(struct parser *ps, const char **key, uint32_t *klen)
{
	struct jdoc *d = ps->d;
	if (!d->kbuf)
		return fail(ps, "escaped member name not supported here");
	int n = unescape(*key, *key + *klen, d->kbuf + d->kused, d->kcap - d->kused);
	if (n < 0)
		return fail(ps, "escaped member name too long, or holding a NUL");
	*key = d->kbuf + d->kused;
	*klen = (uint32_t)n;
	d->kused += (uint32_t)n + 1;
	return 0;
}

/* The member just parsed (the object's last child): note a decoded key, and
 * refuse a name that an earlier member of the object already has. */
static int check_member(struct parser *ps, int obj, bool decoded)
{
	struct jdoc *d = ps->d;
	int last = d->n[obj].last;
	struct jnode *m = &d->n[last];
	m->kdecoded = decoded;
	for (int i = d->n[obj].child; i >= 0 && i != last; i = d->n[i].next)
		if (d->n[i].klen == m->klen && !memcmp(d->n[i].key, m->key, m->klen))
			return err_set(ps->e, C_INVALID_ARGUMENT, "JSON: duplicate member \"%.*s\" at offset %ld",
				       (int)(m->klen > 64 ? 64 : m->klen), m->key, (long)(ps->p - ps->s));
	return 0;
}

static int parse_value(struct parser *ps, int parent, const char *key, uint32_t klen, int depth);

static int parse_container(struct parser *ps, int node, bool obj, int depth)
{
	char close = obj ? '}' : ']';
	ps->p++;
	ws(ps);
	if (ps->p < ps->end && *ps->p == close) {
		ps->p++;
		return 0;
	}
	for (;;) {
		const char *key = NULL;
		uint32_t klen = 0;
		bool decoded = false;
		if (obj) {
			ws(ps);
			const char *k0 = ps->p;
			if (scan_string(ps) < 0)
				return -1;
			key = k0 + 1;
			klen = (uint32_t)(ps->p - k0 - 2);
			if (memchr(key, '\\', klen)) {
				if (decode_key(ps, &key, &klen) < 0)
					return -1;
				decoded = true;
			}
			ws(ps);
			if (ps->p >= ps->end || *ps->p != ':')
				return fail(ps, "expected ':'");
			ps->p++;
		}
		if (parse_value(ps, node, key, klen, depth + 1) < 0)
			return -1;
		if (obj && check_member(ps, node, decoded) < 0)
			return -1;
		ws(ps);
		if (ps->p >= ps->end)
			return fail(ps, "unexpected end");
		if (*ps->p == ',') {
			ps->p++;
			continue;
		}
		if (*ps->p == close) {
			ps->p++;
			return 0;
		}
		return fail(ps, obj ? "expected ',' or '}'" : "expected ',' or ']'");
	}
}

static int parse_value(struct parser *ps, int parent, const char *key, uint32_t klen, int depth)
{
	if (depth > JSON_MAX_DEPTH)
		return fail(ps, "nested too deeply");
	ws(ps);
	if (ps->p >= ps->end)
		return fail(ps, "unexpected end");
	const char *start = ps->p;
	char c = *ps->p;
	int i;
	if (c == '{' || c == '[') {
		i = new_node(ps, parent, c == '{' ? J_OBJ : J_ARR);
		if (i < 0)
			return -1;
		ps->d->n[i].key = key;
		ps->d->n[i].klen = klen;
		return parse_container(ps, i, c == '{', depth);
	}
	enum jtype t;
	if (c == '"') {
		if (scan_string(ps) < 0)
			return -1;
		t = J_STR;
	} else if (c == 't' || c == 'f' || c == 'n') {
		const char *lit = c == 't' ? "true" : c == 'f' ? "false" : "null";
		size_t n = strlen(lit);
		if ((size_t)(ps->end - ps->p) < n || memcmp(ps->p, lit, n))
			return fail(ps, "bad literal");
		ps->p += n;
		t = c == 'n' ? J_NULL : J_BOOL;
	} else if (c == '-' || (c >= '0' && c <= '9')) {
		while (ps->p < ps->end && strchr("+-0123456789.eE", *ps->p) && *ps->p)
			ps->p++;
		t = J_NUM;
	} else {
		return fail(ps, "unexpected character");
	}
	i = new_node(ps, parent, t);
	if (i < 0)
		return -1;
	struct jnode *n = &ps->d->n[i];
	n->key = key;
	n->klen = klen;
	n->val = start;
	n->vlen = (uint32_t)(ps->p - start);
	return 0;
}

int json_parse(struct jdoc *d, const char *s, size_t len, struct err *e)
{
	struct parser ps = {d, s, s + len, s, e};
	d->count = 0;
	d->kused = 0;
	if (parse_value(&ps, -1, NULL, 0, 0) < 0)
		return -1;
	ws(&ps);
	if (ps.p != ps.end)
		return fail(&ps, "trailing data");
	return 0;
}

int json_get(const struct jdoc *d, int obj, const char *key)
{
	if (obj < 0 || d->n[obj].type != J_OBJ)
		return -1;
	size_t k = strlen(key);
	int found = -1;
	/* The last duplicate wins, as in most decoders. */
	JSON_EACH(d, obj, i)
	{
		if (d->n[i].klen == k && !memcmp(d->n[i].key, key, k))
			found = i;
	}
	return found;
}

int json_str(const struct jdoc *d, int node, char *buf, size_t cap)
{
	if (node < 0 || d->n[node].type != J_STR)
		return -1;
	return unescape(d->n[node].val + 1, d->n[node].val + d->n[node].vlen - 1, buf, cap);
}

bool json_str_eq(const struct jdoc *d, int node, const char *s)
{
	char buf[256];
	return json_str(d, node, buf, sizeof buf) >= 0 && !strcmp(buf, s);
}

int json_u64(const struct jdoc *d, int node, uint64_t *v)
{
	if (node < 0 || d->n[node].type != J_NUM || d->n[node].vlen == 0 || d->n[node].vlen > 20)
		return -1;
	uint64_t x = 0;
	for (uint32_t i = 0; i < d->n[node].vlen; i++) {
		char c = d->n[node].val[i];
		if (c < '0' || c > '9' || x > (UINT64_MAX - 9) / 10)
			return -1;
		x = x * 10 + (uint64_t)(c - '0');
	}
	*v = x;
	return 0;
}

bool json_has_children(const struct jdoc *d, int node)
{
	JSON_EACH(d, node, i)
	{
		return true;
	}
	return false;
}

void json_del(struct jdoc *d, int node)
{
	if (node >= 0)
		d->n[node].deleted = 1;
}

/* Appends an empty node (key or NULL) as the last child of parent. */
static int add_child(struct jdoc *d, int parent, const char *key, struct err *e)
{
	if (d->count >= d->cap)
		return err_set(e, C_INVALID_ARGUMENT, "JSON: more than %d values", d->cap);
	int i = d->count++;
	struct jnode *n = &d->n[i];
	memset(n, 0, sizeof *n);
	n->child = n->last = n->next = -1;
	if (key) {
		n->key = key;
		n->klen = (uint32_t)strlen(key);
	}
	struct jnode *pn = &d->n[parent];
	if (pn->last >= 0)
		d->n[pn->last].next = i;
	else
		pn->child = i;
	pn->last = i;
	return i;
}

static void set_raw(struct jdoc *d, int i, const char *raw)
{
	struct jnode *n = &d->n[i];
	n->type = J_RAW;
	n->child = n->last = -1;
	n->val = raw;
	n->vlen = (uint32_t)strlen(raw);
}

int json_set(struct jdoc *d, int obj, const char *key, const char *raw, struct err *e)
{
	if (obj < 0 || d->n[obj].type != J_OBJ)
		return err_set(e, C_INVALID_ARGUMENT, "JSON: setting %s on a non-object", key);
	int i = json_get(d, obj, key);
	if (i < 0 && (i = add_child(d, obj, key, e)) < 0)
		return -1;
	set_raw(d, i, raw);
	return 0;
}

int json_append(struct jdoc *d, int arr, const char *raw, struct err *e)
{
	if (arr < 0 || d->n[arr].type != J_ARR)
		return err_set(e, C_INVALID_ARGUMENT, "JSON: appending to a non-array");
	int i = add_child(d, arr, NULL, e);
	if (i < 0)
		return -1;
	set_raw(d, i, raw);
	return 0;
}

struct writer {
	char *out;
	size_t cap, len;
	bool full;
};

static void put(struct writer *w, const char *s, size_t n)
{
	if (w->full || w->cap - w->len < n) {
		w->full = true;
		return;
	}
	memcpy(w->out + w->len, s, n);
	w->len += n;
}

/* Writes s[0..n) as a JSON string: quote, backslash and control characters
 * escaped, everything else (UTF-8 included) as is. */
static void put_quoted(struct writer *w, const char *s, size_t n)
{
	static const char hex[] = "0123456789abcdef";
	put(w, "\"", 1);
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c == '"' || c == '\\') {
			char esc[2] = {'\\', (char)c};
			put(w, esc, 2);
		} else if (c < 0x20) {
			char esc[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
			put(w, esc, 6);
		} else {
			put(w, (const char *)&c, 1);
		}
	}
	put(w, "\"", 1);
}

static void write_node(const struct jdoc *d, int i, struct writer *w)
{
	const struct jnode *n = &d->n[i];
	if (n->key && n->kdecoded) {
		put_quoted(w, n->key, n->klen);
		put(w, ":", 1);
	} else if (n->key) {
		put(w, "\"", 1);
		put(w, n->key, n->klen);
		put(w, "\":", 2);
	}
	if (n->type == J_OBJ || n->type == J_ARR) {
		put(w, n->type == J_OBJ ? "{" : "[", 1);
		bool first = true;
		JSON_EACH(d, i, c)
		{
			if (!first)
				put(w, ",", 1);
			first = false;
			write_node(d, c, w);
		}
		put(w, n->type == J_OBJ ? "}" : "]", 1);
		return;
	}
	put(w, n->val, n->vlen);
}

int json_write(const struct jdoc *d, char *out, size_t cap, size_t *len, struct err *e)
{
	struct writer w = {out, cap, 0, false};
	write_node(d, 0, &w);
	if (w.full)
		return err_set(e, C_RESOURCE_EXHAUSTED, "JSON: output larger than %zu bytes", cap);
	*len = w.len;
	return 0;
}

size_t json_quote(const char *s, char *out, size_t cap)
{
	size_t o = 0;
	if (cap < 3)
		return 0;
	out[o++] = '"';
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		char esc[8];
		size_t n;
		if (*p == '"' || *p == '\\') {
			esc[0] = '\\'; esc[1] = (char)*p; n = 2;
		} else if (*p < 0x20) {
			static const char hex[] = "0123456789abcdef";
			memcpy(esc, "\\u00", 4);
			esc[4] = hex[*p >> 4]; esc[5] = hex[*p & 15]; n = 6;
		} else {
			esc[0] = (char)*p; n = 1;
		}
		if (o + n + 2 > cap)
			return 0;
		memcpy(out + o, esc, n);
		o += n;
	}
	out[o++] = '"';
	out[o] = 0;
	return o;
}
