#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <unistd.h>

void strfmt(char *buf, size_t cap, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, cap, fmt, ap);
	va_end(ap);
}

void alog(const char *fmt, ...)
{
	char line[768];
	int n = snprintf(line, sizeof line, "agent: ");
	va_list ap;
	va_start(ap, fmt);
	int m = vsnprintf(line + n, sizeof line - n - 1, fmt, ap);
	va_end(ap);
	if (m < 0)
		m = 0;
	n += m;
	if (n > (int)sizeof line - 2)
		n = sizeof line - 2;
	line[n++] = '\n';
	/* Best effort: there is nowhere else to report a failed log write. */
	ssize_t w = write(2, line, n);
	(void)w;
}
