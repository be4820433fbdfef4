#include "err.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int code_from_errno(int errnum)
{
	switch (errnum) {
	case ENOENT:
	case ENXIO:
	case ENODEV:
	case ESRCH:
		return C_NOT_FOUND;
	case EEXIST:
		return C_ALREADY_EXISTS;
	case EINVAL:
	case ENAMETOOLONG:
	case ENOTDIR:
	case EISDIR:
	case ELOOP:
		return C_INVALID_ARGUMENT;
	case EBUSY:
	case ENOTEMPTY:
	case EROFS:
		return C_FAILED_PRECONDITION;
	case EPERM:
	case EACCES:
		return C_PERMISSION_DENIED;
	case ENOMEM:
	case ENOSPC:
	case EMFILE:
	case ENFILE:
	case EAGAIN:
		return C_RESOURCE_EXHAUSTED;
	case ETIMEDOUT:
		return C_DEADLINE_EXCEEDED;
	default:
		return C_INTERNAL;
	}
}

static void vset(struct err *e, int code, int errnum, const char *fmt, va_list ap)
{
	int n = vsnprintf(e->msg, sizeof e->msg, fmt, ap);
	if (n < 0)
		n = 0;
	if ((size_t)n >= sizeof e->msg)
		n = sizeof e->msg - 1;
	if (errnum)
		snprintf(e->msg + n, sizeof e->msg - n, ": %s", strerror(errnum));
	e->code = code;
	e->errnum = errnum;
}

int err_set(struct err *e, int code, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vset(e, code, 0, fmt, ap);
	va_end(ap);
	return -1;
}

int err_sys(struct err *e, const char *fmt, ...)
{
	int errnum = errno;
	va_list ap;
	va_start(ap, fmt);
	vset(e, code_from_errno(errnum), errnum, fmt, ap);
	va_end(ap);
	return -1;
}

int err_errno(struct err *e, int errnum, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vset(e, code_from_errno(errnum), errnum, fmt, ap);
	va_end(ap);
	return -1;
}

const char *code_name(int code)
{
	static const char *const names[] = {
		"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT",
		"DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
		"PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
		"ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE",
	};
	if (code >= 0 && code < (int)(sizeof names / sizeof names[0]))
		return names[code];
	return "CODE?";
}
