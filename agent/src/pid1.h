/* PID 1 duties: early mounts, the console, cgroup controllers, loopback, and
 * the final kill/sync/unmount/power-off. Skipped when not PID 1. */
#ifndef AGENT_PID1_H
#define AGENT_PID1_H

void pid1_setup(void);
/* Makes the agent's own directories under /run. */
void agent_dirs(void);
/* Logs the agent's resident memory (VmRSS, VmHWM). */
void log_memory(const char *when);
/* Never returns. */
void shutdown_now(void) __attribute__((noreturn));

#endif
