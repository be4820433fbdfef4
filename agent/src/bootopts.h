/* What the shim asks of the agent on the kernel command line (shim/vmm/qemu.py).
 * The kernel passes dotted parameters it does not know to no one, so they reach
 * the agent only through /proc/cmdline. */
#ifndef AGENT_BOOTOPTS_H
#define AGENT_BOOTOPTS_H

#include <stdbool.h>

#include "err.h"

/* cloudhv.crun_aslr=off, asked under TCG. QEMU reuses the code it translated
 * only for a process whose code sits at the same virtual addresses: with
 * address randomisation each crun run is translated anew (and fills the
 * translation cache, whose flush slows the whole VM). crun is spawned with
 * ADDR_NO_RANDOMIZE (jobs.c), and the workload gets its randomisation back
 * from the spec (spec.h). */
extern bool bootopt_crun_fixed_layout;

/* Reads the options from `path` (a kernel command line). */
int bootopts_read(const char *path, struct err *e);

#endif
