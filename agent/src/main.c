/* The cloudhv guest agent: PID 1 of the VM and its ttrpc server on vsock.
 * One thread, one epoll loop. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "bootopts.h"
#include "cgroup.h"
#include "ev.h"
#include "log.h"
#include "pid1.h"
#include "podns.h"
#include "proc.h"
#include "redeliver.h"
#include "relay.h"
#include "rpc.h"
#include "ttrpc.h"

static int sigfd = -1;

static void drain_signals(void)
{
	struct signalfd_siginfo si[16];
	while (read(sigfd, si, sizeof si) > 0)
		;
	reap_children();
}

static void usage(void)
{
	fprintf(stderr, "usage: cloudhv-agent [--unix PATH] [--no-vsock]\n"
			"  As PID 1 it takes no options. The flags are for running it on a host\n"
			"  for debugging: --unix also serves ttrpc on a Unix socket.\n");
	exit(2);
}

static void kernel_flags(void)
{
	struct err e;
	if (bootopts_read("/proc/cmdline", &e) < 0)
		alog("%s", e.msg);
	if (bootopt_crun_fixed_layout)
		alog("crun runs without address randomisation (TCG); containers keep theirs");
}

int main(int argc, char **argv)
{
	/* The pod's namespace holder is this binary too (podns.c); it is PID 1
	 * of its own PID namespace, so it must be told apart first. */
	if (argc > 0 && !strcmp(argv[0], PODNS_ARGV0))
		podns_holder_main();
	g_pid1 = getpid() == 1;
	const char *unix_path = NULL;
	bool vsock = true;
	for (int i = 1; i < argc && !g_pid1; i++) {
		if (!strcmp(argv[i], "--unix") && i + 1 < argc)
			unix_path = argv[++i];
		else if (!strcmp(argv[i], "--no-vsock"))
			vsock = false;
		else
			usage();
	}
	if (g_pid1) {
		pid1_setup();
		kernel_flags();
	} else if (prctl(PR_SET_CHILD_SUBREAPER, 1) < 0) {
		alog("prctl PR_SET_CHILD_SUBREAPER: %s", strerror(errno));
	}
	agent_dirs();

	/* Children must not inherit these: spawn() resets mask and dispositions. */
	signal(SIGPIPE, SIG_IGN);
	sigset_t mask;
	sigemptyset(&mask);
	sigaddset(&mask, SIGCHLD);
	if (g_pid1) {
		/* Keyboard/ACPI signals to init are ignored rather than fatal. */
		sigaddset(&mask, SIGTERM);
		sigaddset(&mask, SIGINT);
		sigaddset(&mask, SIGHUP);
	}
	if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0)
		alog("sigprocmask: %s", strerror(errno));

	struct err e;
	if (ev_init(&e) < 0) {
		alog("%s", e.msg);
		if (!g_pid1)
			return 1;
		for (;;)
			pause();
	}
	sigfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
	if (sigfd < 0 || ev_add(sigfd, EPOLLIN, tag_make(TAG_SIGNAL, 0, 0)) < 0)
		alog("signalfd: %s", strerror(errno));
	ttrpc_init(rpc_dispatch, rpc_on_conn_closed);
	if (cgroup_init(&e) < 0)
		alog("%s", e.msg);

	bool listening = false;
	uint64_t next_bind = 0;
	if (unix_path) {
		if (ttrpc_listen_unix(unix_path, &e) < 0) {
			alog("%s", e.msg);
			return 1;
		}
		alog("listening on %s", unix_path);
	}
	if (!vsock)
		listening = true;

	for (;;) {
		uint64_t now = now_ns();
		if (!listening && now >= next_bind) {
			if (ttrpc_listen_vsock(AGENT_PORT, &e) >= 0) {
				listening = true;
				/* Port-forward: without it the pod runs, only forwards fail. */
				if (relay_listen(&e) < 0)
					alog("%s", e.msg);
				struct timespec up;
				clock_gettime(CLOCK_BOOTTIME, &up);
				/* shim/vmm/qemu.py waits for this line before dialling vsock. */
				alog("ready: ttrpc on vsock port %d (%lld ms after boot)", AGENT_PORT,
				     (long long)up.tv_sec * 1000 + up.tv_nsec / 1000000);
			} else {
				alog("%s (retrying)", e.msg);
				next_bind = now + 1000000000ull;
			}
		}
		ttrpc_housekeeping();
		uint64_t wake = rpc_poll_parked();
		uint64_t resend = redeliver_poll();
		if (resend && (!wake || resend < wake))
			wake = resend;
		uint64_t relay_due = relay_housekeeping();
		if (relay_due && (!wake || relay_due < wake))
			wake = relay_due;
		uint16_t conn;
		uint32_t conn_gen;
		if (shutdown_requested(&conn, &conn_gen)) {
			ttrpc_flush_blocking(conn, conn_gen, 1000);
			shutdown_now();
		}
		if (!listening && (!wake || next_bind < wake))
			wake = next_bind;
		int timeout = -1;
		if (wake) {
			now = now_ns();
			timeout = wake <= now ? 0 : (int)((wake - now + 999999) / 1000000);
		}
		struct epoll_event evs[64];
		int n = ev_wait(evs, 64, timeout);
		if (n < 0) {
			if (errno != EINTR)
				alog("epoll_wait: %s", strerror(errno));
			continue;
		}
		for (int i = 0; i < n; i++) {
			uint64_t t = evs[i].data.u64;
			switch (tag_kind(t)) {
			case TAG_LISTEN:
			case TAG_DEBUG_LISTEN:
				ttrpc_on_listen((int)tag_idx(t));
				break;
			case TAG_SIGNAL:
				drain_signals();
				break;
			case TAG_INOTIFY:
				cgroup_on_inotify();
				break;
			case TAG_CONN:
				ttrpc_on_conn(tag_idx(t), tag_gen(t), evs[i].events);
				break;
			case TAG_STDOUT:
			case TAG_STDERR:
			case TAG_STDIN:
				proc_on_event(tag_kind(t), tag_idx(t), tag_gen(t), evs[i].events);
				break;
			case TAG_RELAY_LISTEN:
			case TAG_RELAY_VSOCK:
			case TAG_RELAY_TCP:
				relay_on_event(tag_kind(t), tag_idx(t), tag_gen(t), evs[i].events);
				break;
			}
		}
	}
}
