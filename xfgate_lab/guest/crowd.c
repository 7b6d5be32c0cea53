/* crowd: a crowded guest for scale tests. Usage: crowd TASKS SOCKETS [READYFILE]
 *
 * Starts workers until TASKS tasks (the crowd process included) exist: every 4th worker is a
 * threaded server (its main thread plus 3 threads sharing its fd table), the others forked
 * servers. SOCKETS sockets are spread over the workers, worker 1 holding a tenth of them
 * (many fds in one process). Each worker holds, alternating IPv4 and IPv6 on loopback:
 * a TCP listener, a bound UDP socket, then established TCP pairs (its own connect()ed client
 * and the accept()ed server end) and connected UDP pairs, until its share is held. Workers run
 * as uids 0, 1000 and 1002 in turn (never 1001, the lab's attacker). When every worker holds its
 * sockets, READYFILE (default /run/crowd.ready) gets "TASKS SOCKETS\n"; then all sleep. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define THREADS_PER_THREADED 3
#define PORT_BASE 20000

static const uid_t UIDS[] = {0, 1000, 1002};

static void die(const char *what) {
    fprintf(stderr, "crowd: %s: %s\n", what, strerror(errno));
    _exit(1);
}

static int bound(int family, int type, int port) {
    int s = socket(family, type, 0);
    if (s < 0) die("socket");
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (family == AF_INET) {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) die("bind v4");
    } else {
        setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
        struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(port)};
        a.sin6_addr = in6addr_loopback;
        if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) die("bind v6");
    }
    return s;
}

static void peer_of(int s, struct sockaddr_storage *a, socklen_t *len) {
    *len = sizeof *a;
    if (getsockname(s, (struct sockaddr *)a, len) < 0) die("getsockname");
}

/* Holds `want` sockets (at least 2) on ports port (family 4) and port (family 6). */
static void hold_sockets(int want, int port) {
    int held = 0;
    int lis[2], udp[2];
    int fams[2] = {AF_INET, AF_INET6};
    for (int f = 0; f < 2 && held < want; f++) {
        lis[f] = bound(fams[f], SOCK_STREAM, port);
        if (listen(lis[f], 64) < 0) die("listen");
        held++;
        if (held < want) {
            udp[f] = bound(fams[f], SOCK_DGRAM, port);
            held++;
        } else {
            udp[f] = -1;
        }
    }
    for (int i = 0; held < want; i++) {
        int f = i & 1;
        if (i % 4 < 2 && want - held >= 2) { /* a TCP pair: client + accepted end */
            struct sockaddr_storage a;
            socklen_t len;
            peer_of(lis[f], &a, &len);
            int c = socket(fams[f], SOCK_STREAM, 0);
            if (c < 0) die("socket tcp");
            if (connect(c, (struct sockaddr *)&a, len) < 0) die("connect tcp");
            int s = accept(lis[f], NULL, NULL);
            if (s < 0) die("accept");
            held += 2;
        } else if (udp[f] >= 0) { /* a UDP socket connected to the worker's bound one */
            struct sockaddr_storage a;
            socklen_t len;
            peer_of(udp[f], &a, &len);
            int c = socket(fams[f], SOCK_DGRAM, 0);
            if (c < 0) die("socket udp");
            if (connect(c, (struct sockaddr *)&a, len) < 0) die("connect udp");
            held += 1;
        } else {
            int c = socket(fams[f], SOCK_DGRAM, 0); /* unbound UDP: no port yet */
            if (c < 0) die("socket udp");
            held += 1;
        }
    }
}

static void *sleeper(void *arg) {
    (void)arg;
    for (;;) pause();
    return NULL;
}

static void worker(int index, int threads, int sockets, int ready_fd) {
    char name[32];
    snprintf(name, sizeof name, "crowd-%c%d", threads ? 't' : 'f', index);
    prctl(PR_SET_NAME, name); /* cut to 15 bytes, TASK_COMM_LEN */
    hold_sockets(sockets, PORT_BASE + index);
    uid_t uid = UIDS[index % 3];
    if (uid && (setgid(uid) < 0 || setuid(uid) < 0)) die("setuid");
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    for (int t = 0; t < threads; t++) {
        pthread_t th;
        if (pthread_create(&th, &attr, sleeper, NULL) != 0) die("pthread_create");
    }
    if (write(ready_fd, "r", 1) != 1) die("write ready");
    close(ready_fd);
    for (;;) pause();
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: crowd TASKS SOCKETS [READYFILE]\n");
        return 2;
    }
    int tasks = atoi(argv[1]), sockets = atoi(argv[2]);
    const char *ready = argc > 3 ? argv[3] : "/run/crowd.ready";
    if (tasks < 2 || sockets < 2) {
        fprintf(stderr, "crowd: TASKS and SOCKETS must be at least 2\n");
        return 2;
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    /* Plan: workers until the task budget is used (the crowd process counts as one). */
    int workers = 0, used = 1;
    while (used < tasks) {
        int threaded = workers % 4 == 3 && tasks - used > THREADS_PER_THREADED;
        used += 1 + (threaded ? THREADS_PER_THREADED : 0);
        workers++;
    }
    int first = sockets / 10 > 2 ? sockets / 10 : 2;
    if (workers == 1) first = sockets;
    int rest = workers > 1 ? (sockets - first) / (workers - 1) : 0;
    int extra = workers > 1 ? (sockets - first) % (workers - 1) : 0;
    if (workers > 1 && rest < 2) {
        fprintf(stderr, "crowd: %d sockets do not give %d workers 2 each\n", sockets, workers);
        return 2;
    }
    if (first + 64 > (int)rl.rlim_cur) {
        fprintf(stderr, "crowd: %d fds in one worker exceed the fd limit %ld\n", first,
                (long)rl.rlim_cur);
        return 2;
    }
    prctl(PR_SET_NAME, "crowd");
    int pipefd[2];
    if (pipe(pipefd) < 0) die("pipe");
    used = 1;
    for (int w = 0; w < workers; w++) {
        int threaded = w % 4 == 3 && tasks - used > THREADS_PER_THREADED;
        used += 1 + (threaded ? THREADS_PER_THREADED : 0);
        int share = w == 0 ? first : rest + (w - 1 < extra ? 1 : 0);
        pid_t pid = fork();
        if (pid < 0) die("fork");
        if (pid == 0) {
            close(pipefd[0]);
            worker(w + 1, threaded ? THREADS_PER_THREADED : 0, share, pipefd[1]);
        }
    }
    close(pipefd[1]);
    char buf[256];
    int got = 0;
    while (got < workers) {
        ssize_t n = read(pipefd[0], buf, sizeof buf);
        if (n <= 0) {
            fprintf(stderr, "crowd: %d of %d workers ready, then a worker failed\n", got, workers);
            return 1;
        }
        got += (int)n;
    }
    close(pipefd[0]);
    FILE *f = fopen(ready, "w");
    if (f == NULL) die("ready file");
    fprintf(f, "%d %d\n", used, sockets);
    fclose(f);
    for (;;) pause(); /* the workers stay our children: nothing to reap while they sleep */
}
