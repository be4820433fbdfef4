/* PID 1 duties: early mounts, the console, cgroup controllers, loopback, and
 * the final kill/sync/unmount/power-off. Skipped when not PID 1. */
#ifndef AGENT_PID1_H
#define AGENT_PID1_H

#include <stdbool.h>
#include <stdint.h>

/* True when the agent runs as the VM's init (not on a host, for debugging). */
extern bool g_pid1;

void pid1_setup(void);
/* Makes the agent's own directories under /run. */
void agent_dirs(void);
/* Logs the agent's resident memory (VmRSS, VmHWM). */
void log_memory(const char *when);
/* Shutdown asks for a power-off once its reply to (conn, gen) is flushed. */
void request_shutdown(int conn, uint32_t conn_gen);
bool shutdown_requested(uint16_t *conn, uint32_t *conn_gen);
/* Never returns. */
void shutdown_now(void) __attribute__((noreturn));

#endif
