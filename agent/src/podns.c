#include "podns.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <linux/close_range.h>

#include "log.h"

#define NOBODY 65534

static pid_t holder;
static char ns_dir[32];
/* SetupPod's choice, kept for a holder started again after the first died. */
static bool pod_node_pid, pod_node_ipc;

pid_t podns_pid(void)
{
	return holder;
}

/* In the child, between clone and exec: anything that fails is reported on
 * fd as text; a successful exec closes fd (it is close-on-exec) with nothing
 * written. */
static void __attribute__((noreturn)) child(int fd, const struct sysctl_kv *kv, int n)
{
	char msg[ERR_MSG_MAX];
	sigset_t all;
	sigfillset(&all);
	if (sigprocmask(SIG_UNBLOCK, &all, NULL) < 0) {
		snprintf(msg, sizeof msg, "sigprocmask: %s", strerror(errno));
		goto fail;
	}
	for (int s = 1; s < NSIG; s++)
		signal(s, SIG_DFL); /* SIGKILL, SIGSTOP and the libc's own fail: fine */
	int null = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (null < 0 || dup2(null, 0) < 0 || dup2(null, 1) < 0 || dup2(null, 2) < 0) {
		snprintf(msg, sizeof msg, "stdio on /dev/null: %s", strerror(errno));
		goto fail;
	}
	/* The pod's sysctls go to its namespaces while we may still write them. */
	for (int i = 0; i < n; i++) {
		struct err e;
		if (sysctl_write(&kv[i], &e) < 0) {
			snprintf(msg, sizeof msg, "%s", e.msg);
			goto fail;
		}
	}
	/* Nothing of the agent's stays open in the holder. */
	if (syscall(SYS_close_range, 3, ~0u, CLOSE_RANGE_CLOEXEC) < 0) {
		snprintf(msg, sizeof msg, "close_range: %s", strerror(errno));
		goto fail;
	}
	if (chdir("/") < 0 || setgroups(0, NULL) < 0 || setgid(NOBODY) < 0 || setuid(NOBODY) < 0) {
		snprintf(msg, sizeof msg, "drop to uid %d: %s", NOBODY, strerror(errno));
		goto fail;
	}
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) {
		snprintf(msg, sizeof msg, "no_new_privs: %s", strerror(errno));
		goto fail;
	}
	char *const argv[] = {PODNS_ARGV0, NULL};
	char *const envp[] = {NULL};
	execve("/proc/self/exe", argv, envp);
	snprintf(msg, sizeof msg, "exec /proc/self/exe: %s", strerror(errno));
fail:;
	ssize_t w = write(fd, msg, strlen(msg));
	(void)w;
	_exit(127);
}

static int start(const struct sysctl_kv *kv, int n, bool node_pid, bool node_ipc, struct err *e)
{
	int p[2];
	if (pipe2(p, O_CLOEXEC) < 0)
		return err_sys(e, "pod namespaces: pipe");
	/* clone with a NULL stack behaves as fork: the child is PID 1 of the new
	 * PID namespace and in new IPC and UTS namespaces (the UTS one starts
	 * with the VM's hostname, which SetupPod set to the pod's). Without a
	 * new PID namespace it is an ordinary child, and orphans go to the agent. */
	unsigned long flags = CLONE_NEWUTS | SIGCHLD;
	if (!node_pid)
		flags |= CLONE_NEWPID;
	if (!node_ipc)
		flags |= CLONE_NEWIPC;
	long pid = syscall(SYS_clone, flags, NULL, NULL, NULL, NULL);
	if (pid < 0) {
		err_sys(e, "pod namespaces: clone");
		close(p[0]);
		close(p[1]);
		return -1;
	}
	if (pid == 0) {
		close(p[0]);
		child(p[1], kv, n);
	}
	close(p[1]);
	/* The child only writes a few files and execs: a short wait. */
	char msg[ERR_MSG_MAX];
	ssize_t got;
	while ((got = read(p[0], msg, sizeof msg - 1)) < 0 && errno == EINTR)
		;
	int saved = errno;
	close(p[0]);
	if (got != 0) {
		if (got < 0)
			err_errno(e, saved, "pod namespaces: read from the holder");
		else if (!strncmp(msg, "sysctl ", 7))
			err_set(e, C_INVALID_ARGUMENT, "%.*s", (int)got, msg);
		else
			err_set(e, C_INTERNAL, "pod namespaces: holder: %.*s", (int)got, msg);
		kill((pid_t)pid, SIGKILL); /* the reaper collects it */
		return -1;
	}
	holder = (pid_t)pid;
	snprintf(ns_dir, sizeof ns_dir, "/proc/%d/ns", holder);
	alog("pod namespaces: holder pid %d: pid %s, ipc %s, uts the pod's; %d sysctls", holder,
	     node_pid ? "the VM's" : "the pod's", node_ipc ? "the VM's" : "the pod's", n);
	return 0;
}

const char *podns_ensure(struct err *e)
{
	if (holder <= 0 && start(NULL, 0, pod_node_pid, pod_node_ipc, e) < 0)
		return NULL;
	return ns_dir;
}

int podns_create(const struct sysctl_kv *kv, int n, bool node_pid, bool node_ipc, struct err *e)
{
	if (holder > 0)
		return err_set(e, C_FAILED_PRECONDITION,
			       "pod namespaces exist already (holder pid %d): SetupPod comes once, first", holder);
	pod_node_pid = node_pid;
	pod_node_ipc = node_ipc;
	return start(kv, n, node_pid, node_ipc, e);
}

bool podns_on_exit(pid_t pid, int status)
{
	if (pid <= 0 || pid != holder)
		return false;
	alog("pod namespaces: holder pid %d exited with status %d: the pod's shared namespaces are gone",
	     pid, status);
	holder = 0;
	return true;
}

int podns_holder_main(void)
{
	/* Not dumpable: only CAP_SYS_PTRACE could inspect or trace it. */
	prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
	sigset_t chld;
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, &chld, NULL);
	for (;;) {
		while (waitpid(-1, NULL, WNOHANG) > 0)
			;
		/* Orphans are reparented to us and SIGCHLD follows their exit; the
		 * timeout only bounds a missed wakeup. */
		struct timespec t = {60, 0};
		sigtimedwait(&chld, NULL, &t);
	}
}
