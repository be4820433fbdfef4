/* Test helper, built at test time (musl-gcc -static) into a container image:
 * SysV shared memory, to tell which IPC namespace a container is in (busybox
 * has no ipcmk/ipcs). "shm-probe make KEY" creates a segment; "shm-probe find
 * KEY" prints "found" or "missing". Exit status 0 unless something failed. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/shm.h>

int main(int argc, char **argv)
{
	if (argc != 3 || (strcmp(argv[1], "make") && strcmp(argv[1], "find"))) {
		fprintf(stderr, "usage: shm-probe make|find KEY\n");
		return 2;
	}
	key_t key = (key_t)strtol(argv[2], NULL, 10);
	if (!strcmp(argv[1], "make")) {
		if (shmget(key, 4096, IPC_CREAT | IPC_EXCL | 0600) < 0) {
			printf("shmget: %s\n", strerror(errno));
			return 1;
		}
		printf("made\n");
		return 0;
	}
	if (shmget(key, 0, 0) >= 0) {
		printf("found\n");
		return 0;
	}
	if (errno == ENOENT) {
		printf("missing\n");
		return 0;
	}
	printf("shmget: %s\n", strerror(errno));
	return 1;
}
