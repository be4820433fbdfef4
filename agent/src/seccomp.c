#include "seccomp.h"

#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

/* The rule that denies AF_VSOCK (40), and the comparison that keeps a rule
 * allowing socket() from matching it. */
#define DENY_RULE                                                                         \
	"{\"names\":[\"socket\"],\"action\":\"SCMP_ACT_ERRNO\",\"errnoRet\":1,"              \
	"\"args\":[{\"index\":0,\"value\":40,\"op\":\"SCMP_CMP_EQ\"}]}"
#define NOT_VSOCK "{\"index\":0,\"value\":40,\"op\":\"SCMP_CMP_NE\"}"

_Static_assert(AF_VSOCK == 40, "AF_VSOCK is 40 in the rules above");

/* An unconditional socket rule that allows becomes a rule with NOT_VSOCK:
 * libseccomp lets an unconditional rule for a syscall override any rule with
 * arguments for it, so the deny rule alone would not hold. */
#define MAX_SPLIT 8
static char split[MAX_SPLIT][160];

/* Actions that let the call through (or let something else decide). */
static bool allowing(const char *action)
{
	static const char *const deny[] = {"SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS",
					   "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP"};
	for (size_t i = 0; i < sizeof deny / sizeof deny[0]; i++)
		if (!strcmp(action, deny[i]))
			return false;
	return true;
}

/* Would the comparison a (on args[0]) hold for AF_VSOCK? Unknown: yes. */
static bool cmp_admits_vsock(const struct jdoc *d, int a, char *desc, size_t cap)
{
	char op[32] = "?";
	uint64_t v = 0, v2 = 0;
	json_str(d, json_get(d, a, "op"), op, sizeof op);
	json_u64(d, json_get(d, a, "value"), &v);
	json_u64(d, json_get(d, a, "valueTwo"), &v2);
	snprintf(desc, cap, "args[0] %s %llu", op, (unsigned long long)v);
	const uint64_t x = AF_VSOCK;
	if (!strcmp(op, "SCMP_CMP_NE"))
		return x != v;
	if (!strcmp(op, "SCMP_CMP_EQ"))
		return x == v;
	if (!strcmp(op, "SCMP_CMP_LT"))
		return x < v;
	if (!strcmp(op, "SCMP_CMP_LE"))
		return x <= v;
	if (!strcmp(op, "SCMP_CMP_GT"))
		return x > v;
	if (!strcmp(op, "SCMP_CMP_GE"))
		return x >= v;
	if (!strcmp(op, "SCMP_CMP_MASKED_EQ"))
		return (x & v) == v2;
	return true;
}

static int first_arg0(const struct jdoc *d, int args)
{
	JSON_EACH(d, args, a)
	{
		uint64_t idx;
		if (json_u64(d, json_get(d, a, "index"), &idx) == 0 && idx == 0)
			return a;
	}
	return -1;
}

static int socket_name(const struct jdoc *d, int names)
{
	JSON_EACH(d, names, n)
	{
		if (json_str_eq(d, n, "socket"))
			return n;
	}
	return -1;
}

/* Makes every rule that allows socket() leave AF_VSOCK to the deny rule. */
static int fence_rules(struct jdoc *d, int syscalls, int *nsplit, struct err *e)
{
	JSON_EACH(d, syscalls, r)
	{
		int names = json_get(d, r, "names");
		if (names < 0 || d->n[names].type != J_ARR)
			continue;
		int sock = socket_name(d, names);
		if (sock < 0)
			continue;
		char action[40];
		if (json_str(d, json_get(d, r, "action"), action, sizeof action) < 0)
			return err_set(e, C_INVALID_ARGUMENT, "spec: linux.seccomp: a rule for socket has no action");
		if (!allowing(action))
			continue;
		int args = json_get(d, r, "args");
		if (args >= 0 && d->n[args].type == J_ARR && json_has_children(d, args)) {
			int a0 = first_arg0(d, args);
			char desc[80];
			if (a0 < 0) {
				if (json_append(d, args, NOT_VSOCK, e) < 0)
					return -1;
			} else if (cmp_admits_vsock(d, a0, desc, sizeof desc)) {
				return err_set(e, C_INVALID_ARGUMENT,
					       "spec: linux.seccomp lets socket() open AF_VSOCK (%s, %s): containers may "
					       "not use vsock unless annotation " ALLOW_VSOCK_ANNOTATION " is \"true\"",
					       desc, action);
			}
			continue;
		}
		if (*nsplit == MAX_SPLIT)
			return err_set(e, C_INVALID_ARGUMENT, "spec: linux.seccomp: more than %d rules allow socket",
				       MAX_SPLIT);
		char quoted[sizeof action + 8];
		json_quote(action, quoted, sizeof quoted);
		snprintf(split[*nsplit], sizeof split[0], "{\"names\":[\"socket\"],\"action\":%s,\"args\":[" NOT_VSOCK "]}",
			 quoted);
		(*nsplit)++;
		json_del(d, sock);
		if (!json_has_children(d, names))
			json_del(d, r);
	}
	return 0;
}

static int annotation_allows(const struct jdoc *d, int root, bool *allow, struct err *e)
{
	*allow = false;
	int a = json_get(d, json_get(d, root, "annotations"), ALLOW_VSOCK_ANNOTATION);
	if (a < 0)
		return 0;
	char v[8];
	if (json_str(d, a, v, sizeof v) < 0 || (strcmp(v, "true") && strcmp(v, "false")))
		return err_set(e, C_INVALID_ARGUMENT, "annotation " ALLOW_VSOCK_ANNOTATION ": must be \"true\" or \"false\"");
	*allow = !strcmp(v, "true");
	return 0;
}

int seccomp_deny_vsock(struct jdoc *d, int root, int linux_, struct err *e)
{
	bool allow;
	if (annotation_allows(d, root, &allow, e) < 0)
		return -1;
	if (allow)
		return 0;
	/* No profile is the user's "unconfined": no filter at all, as runc gives it
	 * (critest checks for Seccomp: 0). The agent still refuses every guest peer
	 * and the guest has no vsock loopback, so such a container cannot reach it. */
	if (linux_ < 0)
		return 0;
	int sc = json_get(d, linux_, "seccomp");
	if (sc < 0 || d->n[sc].type == J_NULL)
		return 0;
	if (d->n[sc].type != J_OBJ)
		return err_set(e, C_INVALID_ARGUMENT, "spec: linux.seccomp is not an object");
	int syscalls = json_get(d, sc, "syscalls");
	if (syscalls < 0 || d->n[syscalls].type == J_NULL)
		return json_set(d, sc, "syscalls", "[" DENY_RULE "]", e);
	if (d->n[syscalls].type != J_ARR)
		return err_set(e, C_INVALID_ARGUMENT, "spec: linux.seccomp.syscalls is not an array");
	int nsplit = 0;
	if (fence_rules(d, syscalls, &nsplit, e) < 0 || json_append(d, syscalls, DENY_RULE, e) < 0)
		return -1;
	for (int i = 0; i < nsplit; i++)
		if (json_append(d, syscalls, split[i], e) < 0)
			return -1;
	return 0;
}
