#include "rpc.h"

#include <stdio.h>
#include <string.h>

#include "log.h"
#include "pb_decode.h"
#include "pb_encode.h"
#include "ttrpc.h"

#define MQ(n, Req, Resp, fn, park, quiet) \
	{#n, PB(Req##_fields), PB(Resp##_fields), sizeof(PB(Resp)), fn, park, quiet}
#define M(n, Req, Resp, fn, park) MQ(n, Req, Resp, fn, park, 0)

static const struct method methods[] = {
	M(Health, HealthRequest, HealthResponse, h_health, false),
	M(GuestInfo, GuestInfoRequest, GuestInfoResponse, h_guest_info, false),
	M(MountDisk, MountDiskRequest, MountDiskResponse, h_mount_disk, true),
	M(UnmountDisk, UnmountDiskRequest, Empty, h_unmount_disk, false),
	M(MountSharedFs, MountSharedFsRequest, Empty, h_mount_shared_fs, false),
	M(CreateContainer, CreateContainerRequest, ProcessResponse, h_create_container, true),
	M(StartContainer, ContainerRequest, ProcessResponse, h_start_container, true),
	M(ExecProcess, ExecProcessRequest, ProcessResponse, h_exec_process, true),
	M(SignalProcess, SignalProcessRequest, Empty, h_signal_process, true),
	MQ(WaitProcess, ProcessRequest, WaitProcessResponse, h_wait_process, true, Q_DEADLINE),
	M(RemoveProcess, ProcessRequest, Empty, h_remove_process, false),
	M(RemoveContainer, RemoveContainerRequest, Empty, h_remove_container, true),
	M(ListProcesses, ContainerRequest, ListProcessesResponse, h_list_processes, false),
	M(PauseContainer, ContainerRequest, Empty, h_pause_container, true),
	M(ResumeContainer, ContainerRequest, Empty, h_resume_container, true),
	M(UpdateContainer, UpdateContainerRequest, Empty, h_update_container, true),
	M(StatsContainer, ContainerRequest, StatsContainerResponse, h_stats_container, false),
	MQ(GetOOMEvent, GetOOMEventRequest, OOMEvent, h_get_oom_event, true, Q_DEADLINE),
	MQ(WriteStdin, WriteStdinRequest, WriteStdinResponse, h_write_stdin, true, Q_OK | Q_DEADLINE),
	M(CloseStdin, ProcessRequest, Empty, h_close_stdin, false),
	MQ(ReadStdout, ReadOutputRequest, ReadOutputResponse, h_read_stdout, true, Q_OK | Q_DEADLINE),
	MQ(ReadStderr, ReadOutputRequest, ReadOutputResponse, h_read_stderr, true, Q_OK | Q_DEADLINE),
	M(ResizeTty, ResizeTtyRequest, Empty, h_resize_tty, false),
	M(UpdateInterface, UpdateInterfaceRequest, Empty, h_update_interface, true),
	M(UpdateRoutes, UpdateRoutesRequest, Empty, h_update_routes, false),
	M(SetupPod, SetupPodRequest, Empty, h_setup_pod, false),
	M(CopyFile, CopyFileRequest, Empty, h_copy_file, false),
	M(SetTime, SetTimeRequest, Empty, h_set_time, false),
	M(Shutdown, ShutdownRequest, Empty, h_shutdown, false),
};

/* One request is decoded and handled at a time (single thread), so the
 * decoded request and the response under construction live here. */
static union {
	PB(MountDiskRequest) a;
	PB(UnmountDiskRequest) b;
	PB(CreateContainerRequest) c;
	PB(ContainerRequest) d;
	PB(ExecProcessRequest) e;
	PB(SignalProcessRequest) f;
	PB(ProcessRequest) g;
	PB(RemoveContainerRequest) h;
	PB(UpdateContainerRequest) i;
	PB(WriteStdinRequest) j;
	PB(ReadOutputRequest) k;
	PB(ResizeTtyRequest) l;
	PB(UpdateInterfaceRequest) m;
	PB(UpdateRoutesRequest) n;
	PB(SetupPodRequest) o;
	PB(CopyFileRequest) p;
	PB(SetTimeRequest) q;
	PB(MountSharedFsRequest) r;
} g_req;

static union {
	PB(HealthResponse) a;
	PB(GuestInfoResponse) b;
	PB(MountDiskResponse) c;
	PB(ProcessResponse) d;
	PB(WaitProcessResponse) e;
	PB(ListProcessesResponse) f;
	PB(StatsContainerResponse) g;
	PB(OOMEvent) h;
	PB(WriteStdinResponse) i;
	PB(ReadOutputResponse) j;
} g_resp;

static struct call parked[MAX_PARKED];

void call_ids(struct call *c, const char *cid, const char *eid)
{
	if (eid && *eid)
		snprintf(c->ids, sizeof c->ids, " id=%s exec=%s", cid, eid);
	else
		snprintf(c->ids, sizeof c->ids, " id=%s", cid);
}

static void finish(struct call *c, int r, void *resp, struct err *e)
{
	int code = r == R_DONE ? C_OK : e->code;
	if (code == C_OK && r != R_DONE)
		code = C_INTERNAL;
	uint64_t us = (now_ns() - c->start_ns) / 1000;
	bool ok = code == C_OK;
	int sent = ttrpc_reply(c->conn, c->conn_gen, c->stream, code, e->msg,
			       ok ? c->m->resp_fields : NULL, ok ? resp : NULL);
	if (sent == -2) {
		code = C_INTERNAL;
		err_set(e, C_INTERNAL, "encode %s response", c->m->name);
		sent = ttrpc_reply(c->conn, c->conn_gen, c->stream, code, e->msg, NULL, NULL);
	}
	if (sent == 0 && !c->loud &&
	    ((code == C_OK && (c->m->quiet & Q_OK)) || (code == C_DEADLINE_EXCEEDED && (c->m->quiet & Q_DEADLINE))))
		return;
	alog("%s%s -> %s%s%s (%llu.%03llu ms)%s", c->m->name, c->ids, code_name(code),
	     code ? ": " : "", code ? e->msg : "", (unsigned long long)(us / 1000),
	     (unsigned long long)(us % 1000), sent < 0 ? " [reply not sent]" : "");
}

static void unpark(struct call *c)
{
	if (c->release)
		c->release(c);
	c->used = false;
}

void rpc_dispatch(uint16_t conn, uint32_t gen, uint32_t stream, const char *method,
		  int64_t timeout_nano, const uint8_t *payload, size_t len)
{
	static struct call call;
	static struct err e;
	memset(&call, 0, sizeof call);
	call.conn = conn;
	call.conn_gen = gen;
	call.stream = stream;
	call.start_ns = now_ns();
	if (timeout_nano > 0)
		call.deadline_ns = call.start_ns + (uint64_t)timeout_nano;
	e.code = C_OK;
	e.msg[0] = 0;

	const struct method *m = NULL;
	for (size_t i = 0; i < sizeof methods / sizeof methods[0]; i++)
		if (strcmp(methods[i].name, method) == 0)
			m = &methods[i];
	if (!m) {
		static const struct method unknown = {.name = "?"};
		call.m = &unknown;
		snprintf(call.ids, sizeof call.ids, " method=%s", method);
		err_set(&e, C_UNIMPLEMENTED, "method %s", method);
		finish(&call, R_ERR, NULL, &e);
		return;
	}
	call.m = m;
	struct call *slot = NULL;
	if (m->may_park) {
		for (int i = 0; i < MAX_PARKED && !slot; i++)
			if (!parked[i].used)
				slot = &parked[i];
		if (!slot) {
			err_set(&e, C_RESOURCE_EXHAUSTED, "all %d slots for pending calls are in use", MAX_PARKED);
			finish(&call, R_ERR, NULL, &e);
			return;
		}
	}
	pb_istream_t is = pb_istream_from_buffer(payload, len);
	if (!pb_decode(&is, m->req_fields, &g_req)) {
		err_set(&e, C_INVALID_ARGUMENT, "decode %s request: %s", m->name, PB_GET_ERROR(&is));
		finish(&call, R_ERR, NULL, &e);
		return;
	}
	memset(&g_resp, 0, m->resp_size);
	int r = m->fn(&call, &g_req, &g_resp, &e);
	if (r == R_PARK) {
		*slot = call;
		slot->used = true;
		return;
	}
	finish(&call, r, &g_resp, &e);
}

uint64_t rpc_poll_parked(void)
{
	uint64_t next = 0;
	static struct err e;
	for (int i = 0; i < MAX_PARKED; i++) {
		struct call *c = &parked[i];
		if (!c->used)
			continue;
		if (!ttrpc_alive(c->conn, c->conn_gen)) {
			alog("%s%s -> dropped: connection closed", c->m->name, c->ids);
			unpark(c);
			continue;
		}
		if (!ttrpc_can_reply(c->conn, c->conn_gen))
			continue; /* rechecked once the connection drains */
		e.code = C_OK;
		e.msg[0] = 0;
		memset(&g_resp, 0, c->m->resp_size);
		int r = c->poll(c, &g_resp, &e);
		uint64_t now = now_ns();
		if (r == R_PARK && c->deadline_ns && now >= c->deadline_ns) {
			err_set(&e, C_DEADLINE_EXCEEDED, "%s: deadline exceeded", c->m->name);
			r = R_ERR;
		}
		if (r != R_PARK) {
			finish(c, r, &g_resp, &e);
			unpark(c);
			continue;
		}
		uint64_t t = c->deadline_ns;
		if (c->wake_ns && (!t || c->wake_ns < t))
			t = c->wake_ns;
		if (t && (!next || t < next))
			next = t;
	}
	return next;
}

void rpc_on_conn_closed(uint16_t conn, uint32_t gen)
{
	for (int i = 0; i < MAX_PARKED; i++) {
		struct call *c = &parked[i];
		if (c->used && c->conn == conn && c->conn_gen == gen) {
			alog("%s%s -> dropped: connection closed", c->m->name, c->ids);
			unpark(c);
		}
	}
}
