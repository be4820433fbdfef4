#include "peer.h"

#include <stdint.h>
#include <unistd.h>

#include <linux/vm_sockets.h>

#include "ev.h"
#include "log.h"

bool vsock_peer_allowed(int fd, const struct sockaddr_storage *sa, socklen_t len, const char *what)
{
	static uint64_t last_log;
	static unsigned refused;
	if (sa->ss_family != AF_VSOCK)
		return true;
	const struct sockaddr_vm *vm = (const struct sockaddr_vm *)sa;
	if (len >= sizeof *vm && vm->svm_cid == VMADDR_CID_HOST)
		return true;
	refused++;
	uint64_t now = now_ns();
	if (!last_log || now - last_log >= 1000000000ull) {
		alog("accept (%s): refused a vsock connection from CID %u port %u (only the host, CID %u, may "
		     "connect; %u refused since the last report)",
		     what, len >= sizeof *vm ? vm->svm_cid : 0, len >= sizeof *vm ? vm->svm_port : 0,
		     VMADDR_CID_HOST, refused);
		last_log = now;
		refused = 0;
	}
	close(fd);
	return false;
}
