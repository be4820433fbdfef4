/* MountDisk / UnmountDisk: disks are found by the virtio serial the shim set
 * when it plugged them, waiting for hotplug up to the request's timeout.
 * MountSharedFs: the pod's virtio-fs device, found by its tag. */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>

#include "agent.h"
#include "fsutil.h"
#include "log.h"
#include "rpc.h"

#define HOTPLUG_POLL_NS (10 * 1000000ull)
#define FUSE_SUPER_MAGIC 0x65735546

/* Finds /dev/<name> whose /sys/block/<name>/serial equals serial. */
static bool find_serial(const char *serial, char *dev, size_t cap)
{
	DIR *d = opendir("/sys/block");
	if (!d)
		return false;
	bool found = false;
	struct dirent *de;
	while (!found && (de = readdir(d))) {
		if (de->d_name[0] == '.')
			continue;
		char path[300], buf[64];
		struct err e;
		snprintf(path, sizeof path, "/sys/block/%s/serial", de->d_name);
		if (read_file(path, buf, sizeof buf, NULL, &e) < 0)
			continue;
		buf[strcspn(buf, "\n")] = 0;
		if (strcmp(buf, serial))
			continue;
		if (snprintf(dev, cap, "/dev/%s", de->d_name) >= (int)cap)
			continue;
		struct stat st;
		found = stat(dev, &st) == 0 && S_ISBLK(st.st_mode);
	}
	closedir(d);
	return found;
}

static int disk_poll(struct call *c, void *vresp, struct err *e)
{
	PB(MountDiskResponse) *resp = vresp;
	char dev[32];
	if (c->wake_ns && now_ns() < c->wake_ns)
		return R_PARK;
	if (!find_serial(c->u.disk.serial, dev, sizeof dev)) {
		uint64_t now = now_ns();
		if (now >= c->u.disk.until_ns)
			return err_set(e, C_NOT_FOUND, "no disk with serial %s", c->u.disk.serial);
		c->wake_ns = now + HOTPLUG_POLL_NS;
		return R_PARK;
	}
	const char *target = c->u.disk.target;
	if (mkdir_p(target, 0755, e) < 0)
		return R_ERR;
	struct stat dst, tst;
	if (stat(dev, &dst) == 0 && stat(target, &tst) == 0 && tst.st_dev == dst.st_rdev) {
		snprintf(resp->device, sizeof resp->device, "%s", dev);
		return R_DONE; /* already mounted there: a retried call */
	}
	if (mount(dev, target, c->u.disk.fstype, c->u.disk.flags, c->u.disk.data[0] ? c->u.disk.data : NULL) < 0)
		return err_sys(e, "mount %s on %s", dev, target);
	snprintf(resp->device, sizeof resp->device, "%s", dev);
	return R_DONE;
}

static const struct {
	const char *name;
	unsigned long set, clear;
} mount_flags[] = {
	{"ro", MS_RDONLY, 0}, {"rw", 0, MS_RDONLY}, {"nosuid", MS_NOSUID, 0}, {"suid", 0, MS_NOSUID},
	{"nodev", MS_NODEV, 0}, {"dev", 0, MS_NODEV}, {"noexec", MS_NOEXEC, 0}, {"exec", 0, MS_NOEXEC},
	{"sync", MS_SYNCHRONOUS, 0}, {"dirsync", MS_DIRSYNC, 0}, {"noatime", MS_NOATIME, 0},
	{"nodiratime", MS_NODIRATIME, 0}, {"relatime", MS_RELATIME, 0}, {"strictatime", MS_STRICTATIME, 0},
	{"lazytime", MS_LAZYTIME, 0},
};

int h_mount_disk(struct call *c, const void *vreq, void *vresp, struct err *e)
{
	const PB(MountDiskRequest) *r = vreq;
	strfmt(c->ids, sizeof c->ids, " serial=%s target=%s", r->serial, r->target);
	if (!r->serial[0] || strchr(r->serial, '/'))
		return err_set(e, C_INVALID_ARGUMENT, "bad serial \"%s\"", r->serial);
	if (r->target[0] != '/')
		return err_set(e, C_INVALID_ARGUMENT, "target %s: must be an absolute path", r->target);
	snprintf(c->u.disk.serial, sizeof c->u.disk.serial, "%s", r->serial);
	snprintf(c->u.disk.fstype, sizeof c->u.disk.fstype, "%s", r->fstype[0] ? r->fstype : "ext4");
	snprintf(c->u.disk.target, sizeof c->u.disk.target, "%s", r->target);
	c->u.disk.flags = r->read_only ? MS_RDONLY : 0;
	c->u.disk.data[0] = 0;
	for (pb_size_t i = 0; i < r->options_count; i++) {
		const char *o = r->options[i];
		bool flag = false;
		for (size_t k = 0; k < sizeof mount_flags / sizeof mount_flags[0]; k++)
			if (!strcmp(o, mount_flags[k].name)) {
				c->u.disk.flags = (c->u.disk.flags | mount_flags[k].set) & ~mount_flags[k].clear;
				flag = true;
			}
		if (flag)
			continue;
		size_t l = strlen(c->u.disk.data);
		if (l + strlen(o) + 2 > sizeof c->u.disk.data)
			return err_set(e, C_INVALID_ARGUMENT, "mount options too long");
		snprintf(c->u.disk.data + l, sizeof c->u.disk.data - l, "%s%s", l ? "," : "", o);
	}
	if (r->read_only)
		c->u.disk.flags |= MS_RDONLY;
	c->u.disk.until_ns = now_ns() + (uint64_t)r->timeout_ms * 1000000ull;
	c->poll = disk_poll;
	return disk_poll(c, vresp, e);
}

int h_unmount_disk(struct call *c, const void *vreq, void *vresp, struct err *e)
{
	const PB(UnmountDiskRequest) *r = vreq;
	(void)vresp;
	strfmt(c->ids, sizeof c->ids, " target=%s", r->target);
	if (r->target[0] != '/')
		return err_set(e, C_INVALID_ARGUMENT, "target %s: must be an absolute path", r->target);
	if (umount2(r->target, 0) < 0) {
		if (errno == EINVAL)
			return err_set(e, C_NOT_FOUND, "umount %s: not a mount point", r->target);
		return err_sys(e, "umount %s", r->target);
	}
	return R_DONE;
}

int h_mount_shared_fs(struct call *c, const void *vreq, void *vresp, struct err *e)
{
	const PB(MountSharedFsRequest) *r = vreq;
	(void)vresp;
	strfmt(c->ids, sizeof c->ids, " tag=%s target=%s", r->tag, r->target);
	if (!r->tag[0])
		return err_set(e, C_INVALID_ARGUMENT, "shared fs: empty tag");
	if (r->target[0] != '/')
		return err_set(e, C_INVALID_ARGUMENT, "target %s: must be an absolute path", r->target);
	if (mkdir_p(r->target, 0755, e) < 0)
		return R_ERR;
	struct statfs fs;
	if (statfs(r->target, &fs) < 0)
		return err_sys(e, "statfs %s", r->target);
	if (fs.f_type == FUSE_SUPER_MAGIC)
		return R_DONE; /* mounted already: a retried call */
	/* No nosuid/nodev: a volume behaves in the container as it does under runc. */
	if (mount(r->tag, r->target, "virtiofs", 0, NULL) < 0)
		return err_sys(e, "mount virtiofs %s on %s", r->tag, r->target);
	return R_DONE;
}
