/* Errors travel up as values: a gRPC status code, the errno (0 if none) and a
 * message naming the operation and the object, e.g.
 * "mount /dev/vdb on /run/x: No such device". */
#ifndef AGENT_ERR_H
#define AGENT_ERR_H

#include <stddef.h>

enum code {
	C_OK = 0,
	C_CANCELLED = 1,
	C_UNKNOWN = 2,
	C_INVALID_ARGUMENT = 3,
	C_DEADLINE_EXCEEDED = 4,
	C_NOT_FOUND = 5,
	C_ALREADY_EXISTS = 6,
	C_PERMISSION_DENIED = 7,
	C_RESOURCE_EXHAUSTED = 8,
	C_FAILED_PRECONDITION = 9,
	C_ABORTED = 10,
	C_OUT_OF_RANGE = 11,
	C_UNIMPLEMENTED = 12,
	C_INTERNAL = 13,
	C_UNAVAILABLE = 14,
};

#define ERR_MSG_MAX 480

struct err {
	int code;
	int errnum;
	char msg[ERR_MSG_MAX];
};

/* Sets *e and returns -1, so callers can `return err_set(...)`. */
int err_set(struct err *e, int code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
/* Like err_set with ": strerror(errno)" appended; the code follows errno. */
int err_sys(struct err *e, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
/* Same with an explicit errno value. */
int err_errno(struct err *e, int errnum, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
int code_from_errno(int errnum);
const char *code_name(int code);

#endif
