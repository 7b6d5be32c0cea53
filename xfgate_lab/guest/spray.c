/* spray: the "attacker" (like the thesis's ssh-spraying intruder). Forever, at a bounded rate:
 * opens an outgoing TCP connection to HOST:TCPPORT and closes it, and sends one UDP datagram
 * from one long-lived unconnected socket to HOST:UDPPORT. One process owns every socket, so a
 * per-pid decision sees all of its traffic.
 * Usage: spray HOST TCPPORT UDPPORT [INTERVAL_MS] */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {}
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: spray HOST TCPPORT UDPPORT [INTERVAL_MS]\n");
        return 2;
    }
    long interval = argc > 4 ? atol(argv[4]) : 500;
    if (interval < 100) interval = 100; /* never faster than 10/s */
    struct sockaddr_in tcp = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    struct sockaddr_in udp = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
    if (inet_pton(AF_INET, argv[1], &tcp.sin_addr) != 1) return 2;
    udp.sin_addr = tcp.sin_addr;
    int us = socket(AF_INET, SOCK_DGRAM, 0);
    for (unsigned long n = 0;; n++) {
        int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        if (s >= 0) {
            if (connect(s, (struct sockaddr *)&tcp, sizeof tcp) == 0 || errno == EINPROGRESS) {
                struct pollfd p = {.fd = s, .events = POLLOUT};
                poll(&p, 1, 1000);
            }
            close(s);
        }
        char msg[64];
        int len = snprintf(msg, sizeof msg, "spray %lu\n", n);
        sendto(us, msg, len, 0, (struct sockaddr *)&udp, sizeof udp);
        sleep_ms(interval);
    }
}
