/* Probes for tests/test_vmi_attrib_lab.py, run inside the lab guest (static, no libc deps
 * beyond what gcc -static links). Each mode opens its socket(s), prints "ready", sleeps.
 *   attrib_probe udplite ADDR PORT SECS   UDP-Lite datagrams (IP protocol 136)
 *   attrib_probe mptcp ADDR PORT SECS     socket(AF_INET, SOCK_STREAM, IPPROTO_MPTCP) + connect
 *   attrib_probe thread ADDR PORT SECS    a thread unshare(CLONE_FILES)s, then connects (TCP)
 *   attrib_probe ping ADDR SECS           ICMP echo from a ping socket (SOCK_DGRAM, IPPROTO_ICMP)
 *   attrib_probe packet SECS              an AF_PACKET socket (root)
 *   attrib_probe bomb PROCS DUPS SECS     PROCS processes x DUPS dup()s of one UDP socket
 *   attrib_probe passfd PORT DELAY_MS SECS  (root) forks a child; after DELAY_MS (the host
 *       walks meanwhile) the child drops to uid 1001 and the parent opens a UDP socket
 *       127.0.0.1:PORT -> :PORT+1 (one datagram) and passes it to the child (SCM_RIGHTS):
 *       both hold it, the parent created it; prints "ready PARENT CHILD"
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/ip_icmp.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static struct sockaddr_in target(const char *addr, const char *port) {
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((unsigned short)atoi(port));
    inet_pton(AF_INET, addr, &sa.sin_addr);
    return sa;
}

static const char *g_addr, *g_port;
static int g_secs;

static void *thread_main(void *arg) {
    (void)arg;
    if (unshare(CLONE_FILES) != 0) { perror("unshare"); exit(1); }
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = target(g_addr, g_port);
    if (connect(s, (struct sockaddr *)&sa, sizeof sa) != 0) { perror("connect"); exit(1); }
    printf("ready %d\n", s);
    fflush(stdout);
    sleep((unsigned)g_secs);
    return NULL;
}

static int passfd(int port, int delay_ms, int secs) {
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_DGRAM, 0, pair) != 0) { perror("socketpair"); return 1; }
    char byte = 'x';
    char ctl[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl,
                         .msg_controllen = sizeof ctl};
    pid_t child = fork();
    if (child == 0) {
        usleep((useconds_t)delay_ms * 1000);
        if (setgid(1001) != 0 || setuid(1001) != 0) { perror("setuid"); _exit(1); }
        if (recvmsg(pair[1], &msg, 0) != 1) { perror("recvmsg"); _exit(1); }
        sleep((unsigned)secs);
        _exit(0);
    }
    usleep((useconds_t)delay_ms * 1000 + 300000);
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    char local[16], peer[16];
    snprintf(local, sizeof local, "%d", port);
    snprintf(peer, sizeof peer, "%d", port + 1);
    struct sockaddr_in me = target("127.0.0.1", local), to = target("127.0.0.1", peer);
    if (bind(s, (struct sockaddr *)&me, sizeof me) != 0) { perror("bind"); return 1; }
    if (connect(s, (struct sockaddr *)&to, sizeof to) != 0) { perror("connect"); return 1; }
    if (send(s, "x", 1, 0) != 1) perror("send");
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &s, sizeof s);
    if (sendmsg(pair[0], &msg, 0) != 1) { perror("sendmsg"); return 1; }
    usleep(200000); /* received by the child */
    printf("ready %d %d\n", getpid(), child);
    fflush(stdout);
    sleep((unsigned)secs);
    waitpid(child, NULL, 0);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    const char *mode = argv[1];
    if (!strcmp(mode, "passfd") && argc == 5)
        return passfd(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]));
    if (!strcmp(mode, "udplite") || !strcmp(mode, "mptcp")) {
        int lite = !strcmp(mode, "udplite");
        int s = lite ? socket(AF_INET, SOCK_DGRAM, 136) : socket(AF_INET, SOCK_STREAM, 262);
        if (s < 0) { perror("socket"); return 1; }
        struct sockaddr_in sa = target(argv[2], argv[3]);
        if (connect(s, (struct sockaddr *)&sa, sizeof sa) != 0) { perror("connect"); return 1; }
        printf("ready %d\n", s);
        fflush(stdout);
        for (int i = 0; i < atoi(argv[4]); i++) {
            if (lite) send(s, "x", 1, 0);
            sleep(1);
        }
        return 0;
    }
    if (!strcmp(mode, "thread")) {
        g_addr = argv[2]; g_port = argv[3]; g_secs = atoi(argv[4]);
        pthread_t t;
        pthread_create(&t, NULL, thread_main, NULL);
        pthread_join(t, NULL);
        return 0;
    }
    if (!strcmp(mode, "ping")) {
        int s = socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP);
        if (s < 0) { perror("socket"); return 1; }
        struct sockaddr_in sa = target(argv[2], "0");
        printf("ready %d\n", s);
        fflush(stdout);
        for (int i = 0; i < atoi(argv[3]); i++) {
            struct icmphdr h;
            memset(&h, 0, sizeof h);
            h.type = ICMP_ECHO;
            h.un.echo.sequence = htons((unsigned short)i);
            sendto(s, &h, sizeof h, 0, (struct sockaddr *)&sa, sizeof sa);
            sleep(1);
        }
        return 0;
    }
    if (!strcmp(mode, "packet")) {
        int s = socket(AF_PACKET, SOCK_RAW, htons(0x0003));
        if (s < 0) { perror("socket"); return 1; }
        printf("ready %d\n", s);
        fflush(stdout);
        sleep((unsigned)atoi(argv[2]));
        return 0;
    }
    if (!strcmp(mode, "bomb")) {
        int procs = atoi(argv[2]), dups = atoi(argv[3]), secs = atoi(argv[4]);
        struct rlimit rl;
        getrlimit(RLIMIT_NOFILE, &rl);
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        int s = socket(AF_INET, SOCK_DGRAM, 0);
        for (int p = 0; p < procs; p++) {
            if (fork() == 0) {
                for (int i = 0; i < dups; i++)
                    if (dup(s) < 0) break;
                sleep((unsigned)secs);
                _exit(0);
            }
        }
        printf("ready %d\n", s);
        fflush(stdout);
        while (wait(NULL) > 0) {}
        return 0;
    }
    return 2;
}
