#include "pbfields.h"

#ifdef stdin
#error "pbfields.c must not see <stdio.h>"
#endif

bool create_wants_stdin(const cloudhv_agent_v1_CreateContainerRequest *r)
{
	return r->stdin;
}

bool exec_wants_stdin(const cloudhv_agent_v1_ExecProcessRequest *r)
{
	return r->stdin;
}
