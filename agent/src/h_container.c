/* Container and process lifecycle RPCs, each a crun job. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"
#include "cgroup.h"
#include "fsutil.h"
#include "jobs.h"
#include "pbfields.h"
#include "podns.h"
#include "log.h"
#include "proc.h"
#include "redeliver.h"
#include "sigstate.h"
#include "rpc.h"
#include "spec.h"
#include "sysctl.h"

#define STDIN_WANTED(r) _Generic((r), \
	const PB(CreateContainerRequest) *: create_wants_stdin, \
	const PB(ExecProcessRequest) *: exec_wants_stdin)(r)

static char spec_buf[cloudhv_agent_v1_CreateContainerRequest_size + 8192];
static struct spec_out spec_out = {spec_buf, sizeof spec_buf, 0, {{{0}, {0}}}, 0, false};

static void bundle_path(char *buf, size_t cap, const char *id, const char *leaf)
{
	snprintf(buf, cap, BUNDLES_DIR "/%s%s%s", id, leaf ? "/" : "", leaf ? leaf : "");
}

/* ---- waiting on a crun job ---- */

static int job_poll(struct call *c, void *resp, struct err *e)
{
	struct job *j = job_ref(c->u.job.idx, c->u.job.gen);
	if (!j)
		return err_set(e, C_INTERNAL, "crun job vanished");
	if (!j->finished)
		return R_PARK;
	if (j->err.code != C_OK) {
		*e = j->err;
		return R_ERR;
	}
	if (c->m->resp_fields == PB(ProcessResponse_fields))
		((PB(ProcessResponse) *)resp)->pid = j->result_pid;
	return R_DONE;
}

static void job_call_release(struct call *c)
{
	struct job *j = job_ref(c->u.job.idx, c->u.job.gen);
	if (j)
		job_release(j);
}

static int park_on_job(struct call *c, struct job *j)
{
	c->u.job.idx = job_index(j);
	c->u.job.gen = j->gen;
	c->poll = job_poll;
	c->release = job_call_release;
	return R_PARK;
}

static struct container *job_container(struct job *j)
{
	if (j->cont < 0 || !containers[j->cont].used || containers[j->cont].gen != j->cont_gen)
		return NULL;
	return &containers[j->cont];
}

static int job_for(struct job *j, int ci, int pi)
{
	j->cont = ci;
	j->cont_gen = containers[ci].gen;
	j->proc = pi;
	j->proc_gen = pi >= 0 ? procs[pi].gen : 0;
	return 0;
}

/* Runs `crun <args>` for a container with no stdio of its own. */
static int simple_job(struct call *c, int ci, const char *const *args, job_done_fn done,
		      const char *busy, struct err *e)
{
	struct job *j = job_alloc(e);
	if (!j)
		return R_ERR;
	job_for(j, ci, -1);
	static const int nostdio[3] = {-1, -1, -1};
	if (job_start(j, args, nostdio, done, e) < 0)
		return R_ERR;
	if (busy)
		containers[ci].busy = busy;
	return park_on_job(c, j);
}

static int check_idle(int ci, struct err *e)
{
	if (containers[ci].busy)
		return err_set(e, C_FAILED_PRECONDITION, "container %s is busy: %s in progress",
			       containers[ci].id, containers[ci].busy);
	return 0;
}

static int need_state(int ci, enum cstate want, struct err *e)
{
	if (check_idle(ci, e) < 0)
		return -1;
	enum cstate s = container_state(ci);
	if (s != want)
		return err_set(e, C_FAILED_PRECONDITION, "container %s is %s, not %s", containers[ci].id,
			       cstate_name(s), cstate_name(want));
	return 0;
}

/* Tears down everything the agent made for a container. */
static void container_destroy(int ci)
{
	struct container *ct = &containers[ci];
	char path[256];
	struct err e;
	cgroup_detach(ci);
	if (ct->overlay) {
		bundle_path(path, sizeof path, ct->id, "rootfs");
		if (umount2(path, MNT_DETACH) < 0 && errno != EINVAL && errno != ENOENT)
			alog("umount %s: %s", path, strerror(errno));
	}
	if (ct->tmpfs_upper) {
		bundle_path(path, sizeof path, ct->id, "rw");
		if (umount2(path, MNT_DETACH) < 0 && errno != EINVAL && errno != ENOENT)
			alog("umount %s: %s", path, strerror(errno));
	}
	bundle_path(path, sizeof path, ct->id, NULL);
	if (rm_rf(path, &e) < 0)
		alog("%s", e.msg);
	/* The shim's copies of the container's CRI mounts (CopyFile). Nothing is
	 * mounted there in our namespace; rm_rf neither follows symlinks nor
	 * crosses into another mount. Also after a failed create: the shim copies
	 * again before any retry. */
	snprintf(path, sizeof path, MOUNTS_DIR "/%s", ct->id);
	if (rm_rf(path, &e) < 0)
		alog("%s", e.msg);
	container_free(ci);
}

static int read_pid_file(const char *path, struct err *e)
{
	char buf[32];
	if (read_file(path, buf, sizeof buf, NULL, e) < 0)
		return -1;
	long pid = strtol(buf, NULL, 10);
	if (pid <= 0)
		return err_set(e, C_INTERNAL, "pid file %s: no pid", path);
	return (int)pid;
}

/* After crun create/exec succeeded: the pid, and the pty for a terminal. */
static int adopt_process(struct job *j, const char *pid_file, struct err *e)
{
	int pi = j->proc;
	int pid = read_pid_file(pid_file, e);
	if (pid < 0)
		return -1;
	if (j->console_fd >= 0) {
		int fd = console_receive(j, e);
		if (fd < 0)
			return -1;
		proc_attach_pty(pi, fd);
	}
	proc_set_pid(pi, pid);
	j->result_pid = (uint32_t)pid;
	return pid;
}

/* crun made the container but we cannot use it: have crun forget it. */
static void crun_forget(int ci)
{
	struct err e;
	struct job *j = job_alloc(&e);
	if (j) {
		const char *args[] = {"delete", "-f", containers[ci].id, NULL};
		static const int nostdio[3] = {-1, -1, -1};
		if (job_start(j, args, nostdio, NULL, &e) == 0) {
			j->has_waiter = false;
			return;
		}
	}
	alog("crun delete -f %s: %s", containers[ci].id, e.msg);
}

/* ---- CreateContainer ---- */

static int apply_sysctls(const struct spec_out *so, struct err *e)
{
	for (int i = 0; i < so->n_sysctl; i++) {
		const struct sysctl_kv *kv = &so->sysctl[i];
		if (sysctl_write(kv, e) < 0)
			return -1;
		alog("sysctl %s=%s applied to the VM (the pod's network namespace)", kv->key, kv->val);
	}
	return 0;
}

/* A tmpfs of size_mib at <bundle>/rw for the overlay's upper and work dirs. */
static int mount_tmpfs_upper(int ci, uint32_t size_mib, char *upper, char *work, size_t cap,
			     struct err *e)
{
	char rw[256], data[64];
	bundle_path(rw, sizeof rw, containers[ci].id, "rw");
	if (mkdir(rw, 0755) < 0 && errno != EEXIST)
		return err_sys(e, "mkdir %s", rw);
	snprintf(data, sizeof data, "size=%um,mode=0755", size_mib);
	if (mount("tmpfs", rw, "tmpfs", MS_NOSUID | MS_NODEV, data) < 0)
		return err_sys(e, "mount tmpfs (%s) on %s", data, rw);
	containers[ci].tmpfs_upper = true;
	if (snprintf(upper, cap, "%s/upper", rw) >= (int)cap || snprintf(work, cap, "%s/work", rw) >= (int)cap)
		return err_set(e, C_INVALID_ARGUMENT, "rootfs: %s: path too long", rw);
	return 0;
}

static int mount_overlay(int ci, const PB(Rootfs) *rf, char *root, size_t cap, struct err *e)
{
	const char *lower = rf->path, *upper = rf->upper_dir, *work = rf->work_dir;
	char tmp_upper[256], tmp_work[256];
	if (rf->upper_tmpfs_mib) {
		if (upper[0] || work[0])
			return err_set(e, C_INVALID_ARGUMENT, "rootfs: upper_tmpfs_mib excludes upper_dir and work_dir");
		if (mount_tmpfs_upper(ci, rf->upper_tmpfs_mib, tmp_upper, tmp_work, sizeof tmp_upper, e) < 0)
			return -1;
		upper = tmp_upper;
		work = tmp_work;
	}
	if (upper[0] != '/' || work[0] != '/')
		return err_set(e, C_INVALID_ARGUMENT, "rootfs: upper_dir and work_dir must be absolute guest paths");
	if (strpbrk(lower, ",:") || strpbrk(upper, ",:") || strpbrk(work, ",:"))
		return err_set(e, C_INVALID_ARGUMENT, "rootfs: overlay paths must not contain ',' or ':'");
	if (mkdir_p(upper, 0755, e) < 0 || mkdir_p(work, 0755, e) < 0)
		return -1;
	bundle_path(root, cap, containers[ci].id, "rootfs");
	if (mkdir(root, 0755) < 0 && errno != EEXIST)
		return err_sys(e, "mkdir %s", root);
	char data[900];
	snprintf(data, sizeof data, "lowerdir=%s,upperdir=%s,workdir=%s", lower, upper, work);
	if (mount("overlay", root, "overlay", 0, data) < 0)
		return err_sys(e, "mount overlay (%s) on %s", data, root);
	containers[ci].overlay = true;
	return 0;
}

/* Give a crun job its process's stdio (a console socket for a terminal, pipes
 * otherwise), end its argv with the container id and start it. The job is freed
 * when this fails. */
static int start_crun(struct job *j, int pi, bool terminal, bool want_stdin, const char **args,
		      int n, const char *id, job_done_fn done, struct err *e)
{
	int child[3] = {-1, -1, -1};
	if (terminal) {
		if (console_listen(j, pi, e) < 0)
			goto abort;
		args[n++] = "--console-socket";
		args[n++] = j->console_path;
	} else if (proc_pipes(pi, want_stdin, child, e) < 0) {
		goto abort;
	}
	args[n++] = id;
	args[n] = NULL;
	int rc = job_start(j, args, child, done, e);
	close_child_fds(child);
	return rc;
abort:
	job_abort(j);
	return -1;
}

static void create_done(struct job *j, bool ok)
{
	struct container *ct = job_container(j);
	if (!ct)
		return;
	int ci = j->cont;
	ct->busy = NULL;
	if (ok) {
		char pid_file[256];
		bundle_path(pid_file, sizeof pid_file, ct->id, "init.pid");
		int pid = adopt_process(j, pid_file, &j->err);
		if (pid > 0) {
			ct->state = CS_CREATED;
			cgroup_attach(ci, pid);
			return;
		}
		crun_forget(ci);
	}
	container_destroy(ci);
}

int h_create_container(struct call *c, const void *vreq, void *vresp, struct err *e)
{
	const PB(CreateContainerRequest) *r = vreq;
	(void)vresp;
	call_ids(c, r->container_id, NULL);
	if (check_id("container id", r->container_id, e) < 0)
		return R_ERR;
	if (container_find(r->container_id) >= 0)
		return err_set(e, C_ALREADY_EXISTS, "container %s already exists", r->container_id);
	if (!r->has_rootfs || r->rootfs.path[0] != '/')
		return err_set(e, C_INVALID_ARGUMENT, "rootfs.path must be an absolute guest path");
	struct stat st;
	if (stat(r->rootfs.path, &st) < 0)
		return err_sys(e, "rootfs %s", r->rootfs.path);
	if (!S_ISDIR(st.st_mode))
		return err_set(e, C_INVALID_ARGUMENT, "rootfs %s is not a directory", r->rootfs.path);

	int ci = container_alloc(r->container_id, e);
	if (ci < 0)
		return R_ERR;
	struct container *ct = &containers[ci];
	ct->busy = "create";
	int pi = proc_alloc(ci, "", e);
	struct job *j = NULL;
	if (pi < 0)
		goto fail;
	ct->init = pi;

	char bundle[256], root[256], pid_file[256], cfg[256];
	bundle_path(bundle, sizeof bundle, ct->id, NULL);
	if (rm_rf(bundle, e) < 0 || mkdir_p(bundle, 0700, e) < 0)
		goto fail;
	if (r->rootfs.upper_dir[0] || r->rootfs.upper_tmpfs_mib) {
		if (mount_overlay(ci, &r->rootfs, root, sizeof root, e) < 0)
			goto fail;
	} else {
		snprintf(root, sizeof root, "%s", r->rootfs.path);
	}
	const char *podns = podns_ensure(e);
	if (!podns)
		goto fail;
	if (spec_adapt_config((const char *)r->oci_spec_json.bytes, r->oci_spec_json.size, root, podns,
			      r->terminal, &spec_out, e) < 0)
		goto fail;
	ct->own_pidns = spec_out.own_pidns;
	if (apply_sysctls(&spec_out, e) < 0)
		goto fail;
	bundle_path(cfg, sizeof cfg, ct->id, "config.json");
	if (write_file(cfg, spec_out.buf, spec_out.len, 0600, e) < 0)
		goto fail;
	bundle_path(pid_file, sizeof pid_file, ct->id, "init.pid");

	j = job_alloc(e);
	if (!j)
		goto fail;
	job_for(j, ci, pi);
	const char *args[12];
	int n = 0;
	args[n++] = "create";
	args[n++] = "--bundle";
	args[n++] = bundle;
	args[n++] = "--pid-file";
	args[n++] = pid_file;
	if (start_crun(j, pi, r->terminal, STDIN_WANTED(r), args, n, ct->id, create_done, e) < 0) {
		j = NULL; /* start_crun freed it */
		goto fail;
	}
	return park_on_job(c, j);
fail:
	if (j)
		job_abort(j);
	container_destroy(ci);
	return R_ERR;
}

/* ---- StartContainer ---- */

static void start_done(struct job *j, bool ok)
{
	struct container *ct = job_container(j);
	if (!ct)
		return;
	ct->busy = NULL;
	if (ok) {
		if (ct->state == CS_CREATED)
			ct->state = CS_RUNNING;
		j->result_pid = (uint32_t)procs[ct->init].pid;
	}
}

int h_start_container(struct call *c, const void *vreq, void *vresp, struct err *e)
{
	const PB(ContainerRequest) *r = vreq;
	(void)vresp;
	call_ids(c, r->container_id, NULL);
	int ci = container_get(r->container_id, e);
	if (ci < 0 || need_state(ci, CS_CREATED, e) < 0)
		return R_ERR;
	const char *args[] = {"start", containers[ci].id, NULL};
	return simple_job(c, ci, args, start_done, "start", e);
}

/* ---- ExecProcess ---- */

static void exec_done(struct job *j, bool ok)
{
	struct container *ct = job_container(j);
	if (!ct)
		return;
	int pi = j->proc;
	if (!procs[pi].used || procs[pi].gen != j->proc_gen)
		return;
	char file[256], leaf[32];
	snprintf(leaf, sizeof leaf, "exec-%d.pid", pi);
	bundle_path(file, sizeof file, ct->id, leaf);
	bool adopted = ok && adopt_process(j, file, &j->err) > 0;
	unlink(file);
	snprintf(leaf, sizeof leaf, "exec-%d.json", pi);
	bundle_path(file, sizeof file, ct->id, leaf);
	unlink(file);
	if (!adopted)
		proc_free(pi);
}

int h_exec_process(struct call *c, const void *vreq, void *vresp, struct err *e)
{
	const PB(ExecProcessRequest) *r = vreq;
	(void)vresp;
	call_ids(c, r->container_id, r->exec_id);
	if (check_id("exec id", r->exec_id, e) < 0)
		return R_ERR;
	int ci = container_get(r->container_id, e);
	if (ci < 0 || need_state(ci, CS_RUNNING, e) < 0)
		return R_ERR;
	int old = proc_find(ci, r->exec_id);
	if (old >= 0) {
		if (!procs[old].exited || procs[old].pid == 0)
			return err_set(e, C_ALREADY_EXISTS, "exec %s already exists in container %s", r->exec_id,
				       r->container_id);
		proc_free(old); /* an id may be reused once its process is gone */
	}
	int pi = proc_alloc(ci, r->exec_id, e);
	if (pi < 0)
		return R_ERR;
	struct container *ct = &containers[ci];
	char proc_file[256], pid_file[256], leaf[32];
	snprintf(leaf, sizeof leaf, "exec-%d.json", pi);
	bundle_path(proc_file, sizeof proc_file, ct->id, leaf);
	snprintf(leaf, sizeof leaf, "exec-%d.pid", pi);
	bundle_path(pid_file, sizeof pid_file, ct->id, leaf);
	struct job *j = NULL;
	if (spec_adapt_process((const char *)r->process_json.bytes, r->process_json.size, r->terminal,
			       &spec_out, e) < 0 ||
	    write_file(proc_file, spec_out.buf, spec_out.len, 0600, e) < 0)
		goto fail;
	unlink(pid_file);
	j = job_alloc(e);
	if (!j)
		goto fail;
	job_for(j, ci, pi);
	const char *args[12];
	int n = 0;
	args[n++] = "exec";
	args[n++] = "-d";
	args[n++] = "--process";
	args[n++] = proc_file;
	args[n++] = "--pid-file";
	args[n++] = pid_file;
	if (start_crun(j, pi, r->terminal, STDIN_WANTED(r), args, n, ct->id, exec_done, e) < 0)
		return (proc_free(pi), R_ERR);
	return park_on_job(c, j);
fail:
	if (j)
		job_abort(j);
	proc_free(pi);
	return R_ERR;
}

/* ---- SignalProcess ---- */

static void nothing_done(struct job *j, bool ok)
{
	(void)j;
	(void)ok;
}

int h_signal_process(struct call *c, const void *vreq, void *vresp, struct err *e)
{
	const PB(SignalProcessRequest) *r = vreq;
	(void)vresp;
	call_ids(c, r->container_id, r->exec_id);
	size_t l = strlen(c->ids);
	snprintf(c->ids + l, sizeof c->ids - l, " signal=%u%s", r->signal, r->all ? " all" : "");
	if (r->signal >= 65)
		return err_set(e, C_INVALID_ARGUMENT, "signal %u out of range", r->signal);
	if (r->all) {
		int ci = container_get(r->container_id, e);
		if (ci < 0 || check_idle(ci, e) < 0)
			return R_ERR;
		/* In a PID namespace of its own nothing outlives init; in the pod's or
		 * the VM's, its children may, and crun kills them by cgroup. */
		if (container_state(ci) == CS_STOPPED && containers[ci].own_pidns)
			return err_set(e, C_NOT_FOUND, "process already finished");
		char sig[12];
		snprintf(sig, sizeof sig, "%u", r->signal);
		const char *args[] = {"kill", "--all", containers[ci].id, sig, NULL};
		return simple_job(c, ci, args, nothing_done, NULL, e);
	}
	int pi = proc_get(r->container_id, r->exec_id, e);
	if (pi < 0)
		return R_ERR;
	struct proc *p = &procs[pi];
	if (p->exited)
		return err_set(e, C_NOT_FOUND, "process already finished");
	if (p->pid <= 0)
		return err_set(e, C_FAILED_PRECONDITION, "process is not created yet");
	/* Looked at before the kill: a handler installed just after it would
	 * otherwise hide that this signal was dropped. */
	struct sigstate st;
	bool dropped = r->signal && sigstate_read(p->pid, (int)r->signal, &st) == 0 &&
		       signal_would_drop(&st, (int)r->signal);
	if (kill(p->pid, (int)r->signal) < 0)
		return err_sys(e, "kill %d", p->pid);
	if (dropped) {
		c->loud = true;
		l = strlen(c->ids);
		snprintf(c->ids + l, sizeof c->ids - l, " (no handler yet: re-delivered once there is one)");
		redeliver_add(pi, p->gen, (int)r->signal);
	}
	return R_DONE;
}

/* ---- WaitProcess ---- */

static int wait_poll(struct call *c, void *vresp, struct err *e)
{
	int pi = c->u.proc.idx;
	struct proc *p = &procs[pi];
	if (!p->used || p->gen != c->u.proc.gen)
		return err_set(e, C_NOT_FOUND, "process removed while waiting");
	if (!p->exited)
		return R_PARK;
	PB(WaitProcessResponse) *resp = vresp;
	resp->exit_status = (uint32_t)p->exit_status;
	resp->exited_at_unix_ns = p->exited_at;
	p->exit_delivered = true;
	return R_DONE;
}

int h_wait_process(struct call *c, const void *vreq, void *vresp, struct err *e)
{
	const PB(ProcessRequest) *r = vreq;
	call_ids(c, r->container_id, r->exec_id);
	int pi = proc_get(r->container_id, r->exec_id, e);
	if (pi < 0)
		return R_ERR;
	c->u.proc.idx = pi;
	c->u.proc.gen = procs[pi].gen;
	c->poll = wait_poll;
	return wait_poll(c, vresp, e);
}

/* ---- RemoveProcess ---- */

int h_remove_process(struct call *c, const void *vreq, void *vresp, struct err *e)
{
	const PB(ProcessRequest) *r = vreq;
	(void)vresp;
	call_ids(c, r->container_id, r->exec_id);
	if (!r->exec_id[0])
		return err_set(e, C_INVALID_ARGUMENT,
			       "RemoveProcess needs an exec id: the init process goes with RemoveContainer");
	int pi = proc_get(r->container_id, r->exec_id, e);
	if (pi < 0)
		return R_ERR;
	struct proc *p = &procs[pi];
	if (!p->exited)
		return err_set(e, C_FAILED_PRECONDITION, "exec %s in container %s is %s: kill it first",
			       r->exec_id, r->container_id, p->pid > 0 ? "running" : "being started");
	/* Calls parked on it (WaitProcess, reads) see the generation change and
	 * end with NOT_FOUND. */
	proc_free(pi);
	return R_DONE;
}

/* ---- RemoveContainer ---- */

/* CopyFile'd mounts of a container that never got as far as CreateContainer
 * (the shim's create failed between the copies and crun): no container entry
 * owns them, so a RemoveContainer of the unknown id removes them, and still
 * answers NOT_FOUND. */
static void remove_orphan_copies(const char *id)
{
	struct err e;
	char path[256];
	if (check_id("container id", id, &e) < 0)
		return;
	if (snprintf(path, sizeof path, MOUNTS_DIR "/%s", id) >= (int)sizeof path)
		return;
	if (rm_rf(path, &e) < 0)
		alog("%s", e.msg);
}

static void remove_done(struct job *j, bool ok)
{
	struct container *ct = job_container(j);
	if (!ct)
		return;
	ct->busy = NULL;
	if (!ok) {
		if (!j->force)
			return;
		alog("remove %s: ignoring with force: %s", ct->id, j->err.msg);
		j->err.code = C_OK;
	}
	container_destroy(j->cont);
}

int h_remove_container(struct call *c, const void *vreq, void *vresp, struct err *e)
{
	const PB(RemoveContainerRequest) *r = vreq;
	(void)vresp;
	call_ids(c, r->container_id, NULL);
	int ci = container_get(r->container_id, e);
	if (ci < 0) {
		remove_orphan_copies(r->container_id);
		return R_ERR;
	}
	if (check_idle(ci, e) < 0)
		return R_ERR;
	enum cstate s = container_state(ci);
	if ((s == CS_RUNNING || s == CS_PAUSED) && !r->force)
		return err_set(e, C_FAILED_PRECONDITION, "container %s is %s: kill it first or force",
			       r->container_id, cstate_name(s));
	/* A created container's init is crun's, waiting to exec: deleting it
	 * means killing it, which crun only does with -f. */
	bool force = r->force || s == CS_CREATED;
	const char *forced[] = {"delete", "-f", containers[ci].id, NULL};
	const char *plain[] = {"delete", containers[ci].id, NULL};
	const char *const *args = force ? forced : plain;
	int rc = simple_job(c, ci, args, remove_done, "delete", e);
	if (rc == R_PARK) {
		struct job *j = job_ref(c->u.job.idx, c->u.job.gen);
		j->force = r->force;
	}
	return rc;
}

/* ---- ListProcesses ---- */

int h_list_processes(struct call *c, const void *vreq, void *vresp, struct err *e)
{
	const PB(ContainerRequest) *r = vreq;
	PB(ListProcessesResponse) *resp = vresp;
	call_ids(c, r->container_id, NULL);
	int ci = container_get(r->container_id, e);
	if (ci < 0)
		return R_ERR;
	struct container *ct = &containers[ci];
	const size_t max = sizeof resp->pids / sizeof resp->pids[0];
	if (!ct->cgroup[0]) {
		struct proc *p = ct->init >= 0 ? &procs[ct->init] : NULL;
		if (p && p->pid > 0 && !p->exited)
			resp->pids[resp->pids_count++] = (uint32_t)p->pid;
		return R_DONE;
	}
	static char buf[16384];
	char path[300];
	snprintf(path, sizeof path, "%s/cgroup.procs", ct->cgroup);
	if (read_file(path, buf, sizeof buf, NULL, e) < 0)
		return R_ERR;
	for (char *p = buf; *p && resp->pids_count < max;) {
		char *end;
		unsigned long v = strtoul(p, &end, 10);
		if (end == p)
			break;
		resp->pids[resp->pids_count++] = (uint32_t)v;
		p = end;
		while (*p == '\n')
			p++;
	}
	return R_DONE;
}

/* ---- Pause / Resume / Update ---- */

static void pause_done(struct job *j, bool ok)
{
	struct container *ct = job_container(j);
	if (!ct)
		return;
	ct->busy = NULL;
	if (ok)
		ct->state = CS_PAUSED;
}

static void resume_done(struct job *j, bool ok)
{
	struct container *ct = job_container(j);
	if (!ct)
		return;
	ct->busy = NULL;
	if (ok)
		ct->state = CS_RUNNING;
}

int h_pause_container(struct call *c, const void *vreq, void *vresp, struct err *e)
{
	const PB(ContainerRequest) *r = vreq;
	(void)vresp;
	call_ids(c, r->container_id, NULL);
	int ci = container_get(r->container_id, e);
	if (ci < 0 || need_state(ci, CS_RUNNING, e) < 0)
		return R_ERR;
	const char *args[] = {"pause", containers[ci].id, NULL};
	return simple_job(c, ci, args, pause_done, "pause", e);
}

int h_resume_container(struct call *c, const void *vreq, void *vresp, struct err *e)
{
	const PB(ContainerRequest) *r = vreq;
	(void)vresp;
	call_ids(c, r->container_id, NULL);
	int ci = container_get(r->container_id, e);
	if (ci < 0 || need_state(ci, CS_PAUSED, e) < 0)
		return R_ERR;
	const char *args[] = {"resume", containers[ci].id, NULL};
	return simple_job(c, ci, args, resume_done, "resume", e);
}

static void update_file(char *buf, size_t cap, const char *id, int job)
{
	char leaf[32];
	snprintf(leaf, sizeof leaf, "resources-%d.json", job);
	bundle_path(buf, cap, id, leaf);
}

static void update_done(struct job *j, bool ok)
{
	(void)ok;
	struct container *ct = job_container(j);
	if (ct) {
		char file[256];
		update_file(file, sizeof file, ct->id, job_index(j));
		unlink(file);
	}
}

int h_update_container(struct call *c, const void *vreq, void *vresp, struct err *e)
{
	const PB(UpdateContainerRequest) *r = vreq;
	(void)vresp;
	call_ids(c, r->container_id, NULL);
	int ci = container_get(r->container_id, e);
	if (ci < 0 || check_idle(ci, e) < 0)
		return R_ERR;
	enum cstate s = container_state(ci);
	if (s != CS_CREATED && s != CS_RUNNING && s != CS_PAUSED)
		return err_set(e, C_FAILED_PRECONDITION, "container %s is %s", r->container_id, cstate_name(s));
	struct job *j = job_alloc(e);
	if (!j)
		return R_ERR;
	job_for(j, ci, -1);
	char file[256];
	update_file(file, sizeof file, containers[ci].id, job_index(j));
	if (write_file(file, r->resources_json.bytes, r->resources_json.size, 0600, e) < 0) {
		job_abort(j);
		return R_ERR;
	}
	const char *args[] = {"update", "--resources", file, containers[ci].id, NULL};
	static const int nostdio[3] = {-1, -1, -1};
	if (job_start(j, args, nostdio, update_done, e) < 0) {
		unlink(file);
		return R_ERR;
	}
	return park_on_job(c, j);
}
