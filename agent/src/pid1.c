#include "pid1.h"

#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "fsutil.h"
#include "log.h"
#include "proc.h"

bool g_pid1;
static bool shutdown_pending;
static uint16_t shutdown_conn;
static uint32_t shutdown_gen;

void request_shutdown(int conn, uint32_t gen)
{
	shutdown_pending = true;
	shutdown_conn = (uint16_t)conn;
	shutdown_gen = gen;
}

bool shutdown_requested(uint16_t *conn, uint32_t *gen)
{
	*conn = shutdown_conn;
	*gen = shutdown_gen;
	return shutdown_pending;
}

static void mnt(const char *src, const char *dst, const char *type, unsigned long flags, const char *data)
{
	if (mkdir(dst, 0755) < 0 && errno != EEXIST)
		alog("mkdir %s: %s", dst, strerror(errno));
	if (mount(src, dst, type, flags, data) < 0)
		alog("mount %s on %s: %s", type, dst, strerror(errno));
}

static bool is_mounted(const char *dir)
{
	struct stat a, b;
	char parent[256];
	snprintf(parent, sizeof parent, "%s/..", dir);
	return stat(dir, &a) == 0 && stat(parent, &b) == 0 && a.st_dev != b.st_dev;
}

static void console_stdio(void)
{
	int fd = open("/dev/console", O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (fd < 0)
		fd = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return;
	for (int i = 0; i < 3; i++)
		dup2(fd, i);
	if (fd > 2)
		close(fd);
}

static void enable_controllers(void)
{
	static const char *const ctl[] = {"+cpu", "+cpuset", "+memory", "+pids", "+io"};
	for (size_t i = 0; i < sizeof ctl / sizeof ctl[0]; i++) {
		struct err e;
		if (write_file("/sys/fs/cgroup/cgroup.subtree_control", ctl[i], strlen(ctl[i]), 0644, &e) < 0)
			alog("cgroup controller %s: %s", ctl[i] + 1, e.msg);
	}
}

static void loopback_up(void)
{
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0) {
		alog("socket AF_INET: %s", strerror(errno));
		return;
	}
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	strcpy(ifr.ifr_name, "lo");
	if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0 ||
	    (ifr.ifr_flags |= IFF_UP, ioctl(s, SIOCSIFFLAGS, &ifr) < 0))
		alog("lo up: %s", strerror(errno));
	close(s);
}

void agent_dirs(void)
{
	static const char *const dirs[] = {RUN_DIR, BUNDLES_DIR, SOCK_DIR, JOBS_DIR, CRUN_ROOT};
	for (size_t i = 0; i < sizeof dirs / sizeof dirs[0]; i++) {
		struct err e;
		if (mkdir_p(dirs[i], 0700, &e) < 0)
			alog("%s", e.msg);
	}
}

void pid1_setup(void)
{
	const unsigned long nse = MS_NOSUID | MS_NODEV | MS_NOEXEC;
	/* The kernel mounts devtmpfs on /dev before starting us when
	 * DEVTMPFS_MOUNT is set; mount it only if it is not there. */
	if (!is_mounted("/dev"))
		mnt("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	console_stdio();
	mnt("proc", "/proc", "proc", nse, NULL);
	mnt("sysfs", "/sys", "sysfs", nse, NULL);
	mnt("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5");
	/* Route /dev/ptmx to this devpts instance. */
	if (unlink("/dev/ptmx") < 0 && errno != ENOENT)
		alog("unlink /dev/ptmx: %s", strerror(errno));
	if (symlink("pts/ptmx", "/dev/ptmx") < 0)
		alog("symlink /dev/ptmx: %s", strerror(errno));
	mnt("shm", "/dev/shm", "tmpfs", nse, "mode=1777");
	mnt("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
	mnt("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	mnt("cgroup2", "/sys/fs/cgroup", "cgroup2", nse, NULL);
	enable_controllers();
	loopback_up();
	umask(022);
}

static void reap_for(int ms)
{
	for (int waited = 0; waited < ms; waited += 10) {
		for (;;) {
			pid_t p = waitpid(-1, NULL, WNOHANG);
			if (p > 0)
				continue;
			if (p < 0 && errno == ECHILD)
				return;
			break;
		}
		struct timespec ts = {0, 10 * 1000000};
		nanosleep(&ts, NULL);
	}
}

void log_memory(const char *when)
{
	char buf[2048];
	struct err e;
	if (read_file("/proc/self/status", buf, sizeof buf, NULL, &e) < 0)
		return;
	const char *rss = strstr(buf, "VmRSS:"), *hwm = strstr(buf, "VmHWM:");
	alog("memory %s: rss %llu KiB, peak %llu KiB", when, rss ? strtoull(rss + 6, NULL, 10) : 0,
	     hwm ? strtoull(hwm + 6, NULL, 10) : 0);
}

void shutdown_now(void)
{
	log_memory("at shutdown");
	if (!g_pid1) {
		for (int i = 0; i < MAX_PROCS; i++)
			if (procs[i].used && procs[i].pid > 0 && !procs[i].exited)
				kill(procs[i].pid, SIGKILL);
		alog("shutdown: not PID 1, exiting");
		exit(0);
	}
	alog("shutdown: stopping all processes");
	kill(-1, SIGTERM);
	reap_for(1000);
	kill(-1, SIGKILL);
	reap_for(2000);
	sync();
	/* Unmount in reverse order of mounting; the read-only root stays. */
	static char buf[16384];
	static char *points[256];
	int n = 0;
	struct err e;
	if (read_file("/proc/self/mounts", buf, sizeof buf, NULL, &e) == 0) {
		for (char *line = strtok(buf, "\n"); line && n < 256; line = strtok(NULL, "\n")) {
			char *sp = strchr(line, ' ');
			if (!sp)
				continue;
			char *mp = sp + 1;
			char *end = strchr(mp, ' ');
			if (end)
				*end = 0;
			if (strcmp(mp, "/"))
				points[n++] = mp;
		}
	}
	for (int i = n - 1; i >= 0; i--)
		if (umount2(points[i], 0) < 0 && umount2(points[i], MNT_DETACH) < 0)
			alog("umount %s: %s", points[i], strerror(errno));
	sync();
	alog("shutdown: power off");
	reboot(RB_POWER_OFF);
	/* PID 1 must not exit: that would panic the kernel. */
	alog("reboot: %s", strerror(errno));
	for (;;)
		pause();
}
