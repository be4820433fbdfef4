/* Who may connect to the agent's vsock ports: the host (CID 2) only. */
#ifndef AGENT_PEER_H
#define AGENT_PEER_H

#include <stdbool.h>
#include <sys/socket.h>

/* True for the host, or a non-vsock peer (the --unix debugging socket). Any
 * other peer (a container dialling CID 1 or the guest's own CID) is closed at
 * once, logged at most once a second with a count, so a flood cannot fill the
 * console. `what` names the port's service in the log. */
bool vsock_peer_allowed(int fd, const struct sockaddr_storage *sa, socklen_t len, const char *what);

#endif
