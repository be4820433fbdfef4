/* Test helper, built at test time (musl-gcc -static) into a container image:
 * busybox has no getfattr. "xattr-probe PATH NAME" prints the xattr's value in
 * hex, or "missing". Exit status 0 unless something failed. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/xattr.h>

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: xattr-probe PATH NAME\n");
		return 2;
	}
	unsigned char value[256];
	ssize_t n = lgetxattr(argv[1], argv[2], value, sizeof value);
	if (n < 0) {
		if (errno == ENODATA) {
			printf("missing\n");
			return 0;
		}
		printf("lgetxattr %s %s: %s\n", argv[1], argv[2], strerror(errno));
		return 1;
	}
	for (ssize_t i = 0; i < n; i++)
		printf("%02x", value[i]);
	printf("\n");
	return 0;
}
