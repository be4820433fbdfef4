#include "sigstate.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fsutil.h"

/* The value of "Key:\t..." lines; NULL if absent. */
static const char *field(const char *text, const char *key)
{
	size_t k = strlen(key);
	for (const char *p = text; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL)
		if (!strncmp(p, key, k) && p[k] == ':')
			return p + k + 1;
	return NULL;
}

static int mask_has(const char *text, const char *key, int sig, bool *has)
{
	const char *v = field(text, key);
	if (!v)
		return -1;
	char *end;
	unsigned long long m = strtoull(v, &end, 16);
	if (end == v)
		return -1;
	*has = (m >> (sig - 1)) & 1;
	return 0;
}

int sigstate_parse(const char *status, int sig, struct sigstate *st)
{
	if (sig < 1 || sig > 64)
		return -1;
	memset(st, 0, sizeof *st);
	/* NSpid lists the pid in each namespace, outermost first. */
	const char *ns = field(status, "NSpid");
	if (!ns)
		return -1;
	const char *end = strchr(ns, '\n');
	if (!end)
		end = ns + strlen(ns);
	const char *last = end;
	while (last > ns && (last[-1] == ' ' || last[-1] == '\t'))
		last--;
	while (last > ns && last[-1] >= '0' && last[-1] <= '9')
		last--;
	st->pid1 = strtol(last, NULL, 10) == 1;
	if (mask_has(status, "SigCgt", sig, &st->caught) < 0 || mask_has(status, "SigIgn", sig, &st->ignored) < 0 ||
	    mask_has(status, "SigBlk", sig, &st->blocked) < 0)
		return -1;
	return 0;
}

bool signal_would_drop(const struct sigstate *st, int sig)
{
	return sig != SIGKILL && sig != SIGSTOP && st->pid1 && !st->caught && !st->ignored && !st->blocked;
}

int sigstate_read(pid_t pid, int sig, struct sigstate *st)
{
	char path[32], buf[2048];
	struct err e;
	snprintf(path, sizeof path, "/proc/%d/status", pid);
	if (read_file(path, buf, sizeof buf, NULL, &e) < 0)
		return -1;
	return sigstate_parse(buf, sig, st);
}

