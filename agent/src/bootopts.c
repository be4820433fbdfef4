#include "bootopts.h"

#include <string.h>

#include "fsutil.h"

bool bootopt_crun_fixed_layout;

int bootopts_read(const char *path, struct err *e)
{
	static char line[4096];
	if (read_file(path, line, sizeof line, NULL, e) < 0)
		return -1;
	char *save = NULL;
	for (char *tok = strtok_r(line, " \n", &save); tok; tok = strtok_r(NULL, " \n", &save))
		if (!strcmp(tok, "cloudhv.crun_aslr=off"))
			bootopt_crun_fixed_layout = true;
	return 0;
}
