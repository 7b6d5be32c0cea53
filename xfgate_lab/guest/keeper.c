/* keeper: holds one long-lived TCP connection to HOST:PORT, reconnecting at most once a second
 * when it drops. Usage: keeper HOST PORT */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: keeper HOST PORT\n");
        return 2;
    }
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &sa.sin_addr) != 1) return 2;
    for (;;) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s >= 0 && connect(s, (struct sockaddr *)&sa, sizeof sa) == 0) {
            char buf[512];
            (void)!write(s, "keeper hello\n", 13);
            while (read(s, buf, sizeof buf) > 0) {}
        }
        if (s >= 0) close(s);
        sleep(1);
    }
}
