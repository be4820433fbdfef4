/* What /proc/<pid>/status says about one signal: whether the process catches,
 * ignores or blocks it, and whether it is PID 1 of its PID namespace, where a
 * signal with the default action is dropped (the kernel never kills a PID 1
 * from inside its namespace). */
#ifndef AGENT_SIGSTATE_H
#define AGENT_SIGSTATE_H

#include <stdbool.h>
#include <sys/types.h>

struct sigstate {
	bool pid1;     /* PID 1 of its innermost PID namespace */
	bool caught;   /* SigCgt */
	bool ignored;  /* SigIgn */
	bool blocked;  /* SigBlk: it would stay pending, not be dropped */
};

/* Parses a status file's text for sig (1..64); -1 if a line is missing. */
int sigstate_parse(const char *status, int sig, struct sigstate *st);
/* Reads /proc/<pid>/status; -1 if the process is gone. */
int sigstate_read(pid_t pid, int sig, struct sigstate *st);
/* True if sig sent now to a process in state st is discarded by the kernel. */
bool signal_would_drop(const struct sigstate *st, int sig);

#endif
