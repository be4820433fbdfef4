/* Test helper, built at test time (musl-gcc -static) into a container image:
 * tries to reach the guest agent over vsock and says how far it got, one line
 * per CID: "cid N: socket: <error>", "connect: <error>", "closed", "recv:
 * <error>" or "reply". Exit status: the number of CIDs that replied. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <linux/vm_sockets.h>

/* One ttrpc frame: header (length, stream 1, type request, no flags) and a
 * Request{service: "cloudhv.agent.v1.Agent", method: "Health"}. */
static const unsigned char health[] = {
	0, 0, 0, 32, 0, 0, 0, 1, 1, 0,
	0x0a, 22, 'c', 'l', 'o', 'u', 'd', 'h', 'v', '.', 'a', 'g', 'e', 'n', 't', '.', 'v', '1', '.', 'A', 'g', 'e', 'n', 't',
	0x12, 6, 'H', 'e', 'a', 'l', 't', 'h',
};

static int probe(unsigned cid, unsigned port)
{
	int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (fd < 0) {
		printf("cid %u: socket: %s\n", cid, strerror(errno));
		return 0;
	}
	struct timeval tv = {3, 0};
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	struct sockaddr_vm sa = {.svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port};
	if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
		printf("cid %u: connect: %s\n", cid, strerror(errno));
		close(fd);
		return 0;
	}
	int got = 0;
	if (send(fd, health, sizeof health, MSG_NOSIGNAL) < 0) {
		printf("cid %u: send: %s\n", cid, strerror(errno));
	} else {
		unsigned char buf[256];
		ssize_t n = recv(fd, buf, sizeof buf, 0);
		if (n > 0) {
			printf("cid %u: reply\n", cid);
			got = 1;
		} else if (n == 0) {
			printf("cid %u: closed\n", cid);
		} else {
			printf("cid %u: recv: %s\n", cid, strerror(errno));
		}
	}
	close(fd);
	return got;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: vsock-probe PORT CID...\n");
		return 100;
	}
	unsigned port = (unsigned)strtoul(argv[1], NULL, 10);
	int replies = 0;
	for (int i = 2; i < argc; i++)
		replies += probe((unsigned)strtoul(argv[i], NULL, 10), port);
	fflush(stdout);
	return replies;
}
