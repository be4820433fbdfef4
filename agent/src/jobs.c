#include "jobs.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <string.h>
#include <sys/personality.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "agent.h"
#include "bootopts.h"
#include "fsutil.h"
#include "log.h"
#include "proc.h"

static struct job jobs[MAX_JOBS];
static uint32_t job_gen_seq;

static char *const crun_env[] = {
	"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	"HOME=/",
	NULL,
};

int job_index(const struct job *j)
{
	return (int)(j - jobs);
}

struct job *job_ref(int idx, uint32_t gen)
{
	if (idx < 0 || idx >= MAX_JOBS || !jobs[idx].used || jobs[idx].gen != gen)
		return NULL;
	return &jobs[idx];
}

static pid_t spawn(const char *const *argv, const int stdio[3], struct err *e)
{
	posix_spawn_file_actions_t fa;
	posix_spawnattr_t at;
	int devnull = -1;
	pid_t pid = -1;
	int rc;
	for (int i = 0; i < 3; i++)
		if (stdio[i] < 0 && devnull < 0) {
			devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
			if (devnull < 0)
				return err_sys(e, "open /dev/null");
		}
	if ((rc = posix_spawn_file_actions_init(&fa))) {
		if (devnull >= 0)
			close(devnull);
		return err_errno(e, rc, "spawn %s", argv[0]);
	}
	posix_spawnattr_init(&at);
	sigset_t none, all;
	sigemptyset(&none);
	sigfillset(&all);
	posix_spawnattr_setsigmask(&at, &none);
	posix_spawnattr_setsigdefault(&at, &all);
	posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
	for (int i = 0; i < 3; i++) {
		rc = posix_spawn_file_actions_adddup2(&fa, stdio[i] >= 0 ? stdio[i] : devnull, i);
		if (rc)
			break;
	}
	/* The child takes the personality it is spawned with; ours is put back
	 * at once (the agent is single-threaded: nothing else spawns between). */
	int persona = -1;
	if (!rc && bootopt_crun_fixed_layout) {
		persona = personality(0xffffffff);
		if (persona < 0 || personality((unsigned long)persona | ADDR_NO_RANDOMIZE) < 0) {
			rc = errno;
			persona = -1;
		}
	}
	if (!rc)
		rc = posix_spawn(&pid, argv[0], &fa, &at, (char *const *)argv, crun_env);
	if (persona >= 0 && personality((unsigned long)persona) < 0)
		alog("personality: restoring %#x: %s", persona, strerror(errno));
	posix_spawn_file_actions_destroy(&fa);
	posix_spawnattr_destroy(&at);
	if (devnull >= 0)
		close(devnull);
	if (rc)
		return err_errno(e, rc, "spawn %s", argv[0]);
	return pid;
}

struct job *job_alloc(struct err *e)
{
	for (int i = 0; i < MAX_JOBS; i++) {
		struct job *j = &jobs[i];
		if (j->used)
			continue;
		memset(j, 0, sizeof *j);
		j->used = true;
		j->gen = job_gen_seq = (job_gen_seq + 1) & 0x7fffffff;
		j->cont = j->proc = -1;
		j->console_fd = -1;
		j->has_waiter = true;
		return j;
	}
	err_set(e, C_RESOURCE_EXHAUSTED, "all %d crun job slots are in use", MAX_JOBS);
	return NULL;
}

void job_abort(struct job *j)
{
	console_close(j);
	j->used = false;
}

int job_start(struct job *j, const char *const *args, const int stdio[3], job_done_fn done,
	      struct err *e)
{
	snprintf(j->log_path, sizeof j->log_path, JOBS_DIR "/%d.log", job_index(j));
	char logarg[80];
	snprintf(logarg, sizeof logarg, "file:%s", j->log_path);
	const char *argv[24];
	int n = 0;
	argv[n++] = CRUN_BIN;
	argv[n++] = "--root";
	argv[n++] = CRUN_ROOT;
	argv[n++] = "--log";
	argv[n++] = logarg;
	for (int i = 0; args[i]; i++) {
		if (n == 23) {
			job_abort(j);
			return err_set(e, C_INTERNAL, "crun: too many arguments");
		}
		argv[n++] = args[i];
	}
	argv[n] = NULL;
	if (unlink(j->log_path) < 0 && errno != ENOENT) {
		err_sys(e, "unlink %s", j->log_path);
		job_abort(j);
		return -1;
	}
	j->what = args[0];
	j->done = done;
	pid_t pid = spawn(argv, stdio, e);
	if (pid < 0) {
		job_abort(j);
		return -1;
	}
	j->pid = pid;
	return 0;
}

/* crun's error message: the tail of its log file, one line. */
static void crun_error(struct job *j, int status)
{
	static char buf[4096];
	size_t len = 0;
	struct err ignored;
	buf[0] = 0;
	read_file(j->log_path, buf, sizeof buf, &len, &ignored);
	while (len && (buf[len - 1] == '\n' || buf[len - 1] == ' '))
		buf[--len] = 0;
	char *msg = buf;
	char *nl = strrchr(buf, '\n');
	if (nl)
		msg = nl + 1;
	if (!*msg)
		msg = "(no message)";
	int code = C_INTERNAL;
	if (strstr(msg, "does not exist") || strstr(msg, "No such file or directory"))
		code = C_NOT_FOUND;
	else if (strstr(msg, "already exists"))
		code = C_ALREADY_EXISTS;
	err_set(&j->err, code, "crun %s %s: exit status %d: %.300s", j->what,
		j->cont >= 0 ? containers[j->cont].id : "", status, msg);
}

bool job_on_exit(pid_t pid, int status)
{
	for (int i = 0; i < MAX_JOBS; i++) {
		struct job *j = &jobs[i];
		if (!j->used || j->finished || j->pid != pid || pid <= 0)
			continue;
		bool ok = status == 0;
		if (!ok)
			crun_error(j, status);
		if (j->done)
			j->done(j, ok);
		console_close(j);
		unlink(j->log_path);
		j->finished = true;
		if (!j->has_waiter) {
			if (j->err.code != C_OK)
				alog("crun %s (no caller waiting): %s", j->what, j->err.msg);
			j->used = false;
		}
		return true;
	}
	return false;
}

void job_release(struct job *j)
{
	j->has_waiter = false;
	if (j->finished)
		j->used = false;
}

int console_listen(struct job *j, int pi, struct err *e)
{
	snprintf(j->console_path, sizeof j->console_path, SOCK_DIR "/console-%d-%d.sock", job_index(j), pi);
	unlink(j->console_path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return err_sys(e, "socket AF_UNIX");
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	strcpy(sa.sun_path, j->console_path);
	if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
		err_sys(e, "bind %s", j->console_path);
		close(fd);
		return -1;
	}
	if (listen(fd, 1) < 0) {
		err_sys(e, "listen %s", j->console_path);
		close(fd);
		unlink(j->console_path);
		return -1;
	}
	j->console_fd = fd;
	return 0;
}

int console_receive(struct job *j, struct err *e)
{
	int c = accept4(j->console_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (c < 0)
		return err_sys(e, "accept on console socket %s", j->console_path);
	char data[256];
	union {
		struct cmsghdr h;
		char buf[CMSG_SPACE(sizeof(int))];
	} ctl;
	struct iovec iov = {data, sizeof data};
	struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
			   .msg_controllen = sizeof ctl.buf};
	ssize_t n = recvmsg(c, &m, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
	int saved = errno;
	close(c);
	if (n < 0)
		return err_errno(e, saved, "receive the pty from crun");
	struct cmsghdr *h = CMSG_FIRSTHDR(&m);
	if (!h || h->cmsg_level != SOL_SOCKET || h->cmsg_type != SCM_RIGHTS ||
	    h->cmsg_len != CMSG_LEN(sizeof(int)))
		return err_set(e, C_INTERNAL, "crun sent no pty over the console socket");
	int fd;
	memcpy(&fd, CMSG_DATA(h), sizeof fd);
	if (fcntl(fd, F_SETFL, O_NONBLOCK | O_RDWR) < 0) {
		err_sys(e, "fcntl pty");
		close(fd);
		return -1;
	}
	return fd;
}

void console_close(struct job *j)
{
	if (j->console_fd >= 0) {
		close(j->console_fd);
		unlink(j->console_path);
	}
	j->console_fd = -1;
}
