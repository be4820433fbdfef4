/* Terse log lines to stderr (/dev/console when PID 1), one write per line. */
#ifndef AGENT_LOG_H
#define AGENT_LOG_H

#include <stddef.h>

void alog(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* snprintf for messages and names where cutting the text short is fine. */
void strfmt(char *buf, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif
