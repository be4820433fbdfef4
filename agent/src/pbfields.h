/* The proto field "stdin" collides with the stdin macro of <stdio.h>, so it
 * is read through these accessors, compiled without <stdio.h>. */
#ifndef AGENT_PBFIELDS_H
#define AGENT_PBFIELDS_H

#include "agent.pb.h"

bool create_wants_stdin(const cloudhv_agent_v1_CreateContainerRequest *r);
bool exec_wants_stdin(const cloudhv_agent_v1_ExecProcessRequest *r);

#endif
