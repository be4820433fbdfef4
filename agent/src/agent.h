/* Limits and paths shared by every module. Every table and buffer in the
 * agent is fixed in size; running out is RESOURCE_EXHAUSTED. */
#ifndef AGENT_H
#define AGENT_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "agent.pb.h"
#include "ev.h"

#define AGENT_VERSION "0.1.0"
#define AGENT_PORT 1024
#define AGENT_SERVICE "cloudhv.agent.v1.Agent"

#define RUN_DIR "/run/cloudhv"
#define BUNDLES_DIR RUN_DIR "/containers"
#define SOCK_DIR RUN_DIR "/sock"
#define JOBS_DIR RUN_DIR "/jobs"
/* The shim's copies of a container's CRI mounts: MOUNTS_DIR/<container id>/ */
#define MOUNTS_DIR RUN_DIR "/mounts"
#define CRUN_BIN "/usr/bin/crun"
#define CRUN_ROOT "/run/crun"

#define MAX_CONNS 8
#define MAX_CONTAINERS 64
#define MAX_PROCS 128
#define MAX_PARKED 256
#define MAX_JOBS 32
#define STREAM_BUF 65536          /* output buffered per stream in the agent */
/* A stdout/stderr pipe's capacity: the process writes on into it while a read
 * reply is on its way (pages are allocated only for what the pipe holds). */
#define OUTPUT_PIPE_SIZE (1 << 20)
/* The most one ReadStdout/ReadStderr reply carries (agent.options). */
#define READ_MAX sizeof(((cloudhv_agent_v1_ReadOutputResponse *)0)->data.bytes)
#define MAX_FRAME_DATA (4u << 20) /* ttrpc's limit */
/* The largest request we decode is CopyFile; anything bigger cannot fit a
 * field's max_size anyway and is discarded like an over-limit frame. */
#define IN_CAP (cloudhv_agent_v1_CopyFileRequest_size + 16384)
#define MAX_RESP_PAYLOAD cloudhv_agent_v1_ReadOutputResponse_size
/* Header + envelope (status with message, payload tag) + payload. */
#define MAX_RESP_FRAME (10 + 600 + 8 + MAX_RESP_PAYLOAD)
#define OUT_CAP (4 * MAX_RESP_FRAME)
#define ID_MAX 72                 /* container_id / exec_id buffers */

#endif
