/*
 * udp-echo: the UDP server of natmap's test image (scripts/deps.sh builds it
 * statically and puts it in natmap-test-busybox:latest as /bin/udp-echo).
 *
 * Why it exists: Debian's busybox-static has no UDP server at all. Its `nc` is
 * the small variant without -u, and udpsvd/socat are not compiled in, so
 * "busybox nc serves UDP" (DESIGN.md §8) is not possible with it.
 *
 *   udp-echo PORT [TAG]
 *
 * Answers every datagram with TAG followed by the datagram's bytes, so a test
 * can tell which target answered (TAG) and that the payload went through
 * intact. Logs "from ADDR PORT len N" per datagram on stdout, so the source
 * address the target saw (SNAT, hairpin MASQUERADE) can be read from
 * `docker logs`. Listens on [::] dual-stack when IPv6 works, else on 0.0.0.0.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc < 2 || argc > 3) {
		fprintf(stderr, "usage: %s PORT [TAG]\n", argv[0]);
		return 2;
	}
	char *end;
	long port = strtol(argv[1], &end, 10);
	if (*end != '\0' || port < 1 || port > 65535) {
		fprintf(stderr, "udp-echo: bad port: %s\n", argv[1]);
		return 2;
	}
	const char *tag = argc == 3 ? argv[2] : "";
	size_t tag_len = strlen(tag);

	int fd = socket(AF_INET6, SOCK_DGRAM, 0);
	if (fd >= 0) {
		int off = 0;
		struct sockaddr_in6 a6 = { .sin6_family = AF_INET6, .sin6_port = htons((unsigned short)port), .sin6_addr = IN6ADDR_ANY_INIT };
		if (setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off) != 0 ||
		    bind(fd, (struct sockaddr *)&a6, sizeof a6) != 0) {
			close(fd);
			fd = -1;
		}
	}
	if (fd < 0) {
		fd = socket(AF_INET, SOCK_DGRAM, 0);
		struct sockaddr_in a4 = { .sin_family = AF_INET, .sin_port = htons((unsigned short)port), .sin_addr = { htonl(INADDR_ANY) } };
		if (fd < 0 || bind(fd, (struct sockaddr *)&a4, sizeof a4) != 0) {
			fprintf(stderr, "udp-echo: bind port %ld: %s\n", port, strerror(errno));
			return 1;
		}
	}
	printf("listening udp %ld\n", port);
	fflush(stdout);

	static char buf[65536];
	for (;;) {
		struct sockaddr_storage from;
		socklen_t from_len = sizeof from;
		size_t room = sizeof buf - tag_len;
		ssize_t n = recvfrom(fd, buf + tag_len, room, 0, (struct sockaddr *)&from, &from_len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			fprintf(stderr, "udp-echo: recvfrom: %s\n", strerror(errno));
			return 1;
		}
		memcpy(buf, tag, tag_len);

		char host[INET6_ADDRSTRLEN] = "?";
		unsigned peer_port = 0;
		if (from.ss_family == AF_INET6) {
			struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&from;
			if (IN6_IS_ADDR_V4MAPPED(&s6->sin6_addr))
				inet_ntop(AF_INET, &s6->sin6_addr.s6_addr[12], host, sizeof host);
			else
				inet_ntop(AF_INET6, &s6->sin6_addr, host, sizeof host);
			peer_port = ntohs(s6->sin6_port);
		} else if (from.ss_family == AF_INET) {
			struct sockaddr_in *s4 = (struct sockaddr_in *)&from;
			inet_ntop(AF_INET, &s4->sin_addr, host, sizeof host);
			peer_port = ntohs(s4->sin_port);
		}
		printf("from %s %u len %zd\n", host, peer_port, n);
		fflush(stdout);

		if (sendto(fd, buf, tag_len + (size_t)n, 0, (struct sockaddr *)&from, from_len) < 0)
			fprintf(stderr, "udp-echo: sendto %s: %s\n", host, strerror(errno));
	}
}
