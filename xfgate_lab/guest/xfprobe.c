/* xfprobe: the red team's probes, one static binary with one subcommand per technique (tests
 * only; built into the lab guest's initramfs). Every loop is bounded in count and in time.
 * Each subcommand prints one line "xfprobe NAME: ..." with what it did.
 *   mptcp HOST PORT N            N MPTCP connections (IPPROTO_MPTCP), 1 s each
 *   thread-files HOST PORT N     a thread leaves the process's fd table (unshare(CLONE_FILES))
 *                                 and opens N connections from its private table
 *   udplite HOST PORT N          N UDP-Lite datagrams (IP protocol 136); HOST v4 or v6
 *   ping HOST N                  N ICMP/ICMPv6 echoes from an unprivileged ping socket
 *   fdbomb HOST PORT PROCS DUPS SECONDS  PROCS processes dup() one socket DUPS times each
 *                                 while the parent connects every 200 ms for SECONDS
 *   bind6only PORT SECONDS       listen on [::]:PORT with IPV6_V6ONLY for SECONDS
 *   spawn HOST PORT N GEN        fork GEN generations (each parent exits: double fork), the
 *                                 last one opens N connections, one per second
 *   rename NAME HOST PORT N      prctl(PR_SET_NAME, NAME), then N connections
 *   raw-tcp SPORT HOST DPORT N   (root) N hand-made TCP SYNs from a raw socket, source SPORT
 *   frames IFACE KIND N          (root) N Ethernet frames from AF_PACKET: KIND vlan (802.1Q
 *                                 with IPv4/UDP inside), qinq, pppoe (PPPoE session, IPv4/UDP),
 *                                 other (ethertype 0x88b5), broadcast destination
 *   flood HOST SECONDS MAX       new TCP connections to random ports as fast as possible
 *   send-close KIND HOST PORT N  N times: a new datagram socket (KIND udp, udplite or ping),
 *                                 one datagram (an echo for ping), close at once: the socket
 *                                 is gone before the gate's verdict on its datagram
 *   hold HOST PORT SECONDS       one connection held open (a long-lived flow), then closed
 *   newflows PORT N DELAY_MS HOLD_S  (bench) one process listens on 0.0.0.0:PORT, waits
 *                                 DELAY_MS (the host walks meanwhile), then, 20 ms apart, opens
 *                                 N listeners 0.0.0.0:PORT+1000+i, N loopback connections
 *                                 127.0.0.1:PORT+1+i -> :PORT (accepted) and N UDP sockets
 *                                 127.0.0.1:PORT+2000+i connected to :PORT (one datagram
 *                                 each); prints "newflows: ready", holds them HOLD_S
 * Sockets held for the walks to find (tests/test_vmi_attrib_lab.py): each prints "ready FD"
 * once its socket is open, then holds it for SECS seconds.
 *   hold-udplite HOST PORT SECS  a connected UDP-Lite socket, one datagram a second
 *   hold-mptcp HOST PORT SECS    an MPTCP connection (IPPROTO_MPTCP)
 *   hold-thread HOST PORT SECS   a thread unshare(CLONE_FILES)s, then connects (TCP)
 *   hold-ping HOST SECS          a ping socket (SOCK_DGRAM, IPPROTO_ICMP), one echo a second
 *   hold-packet SECS             an AF_PACKET socket (root)
 *   hold-bomb PROCS DUPS SECS    PROCS processes x DUPS dup()s of one UDP socket
 *   hold-passfd PORT DELAY_MS SECS  (root) forks a child; after DELAY_MS (the host walks
 *                                 meanwhile) the child drops to uid 1001 and the parent opens a
 *                                 UDP socket 127.0.0.1:PORT -> :PORT+1 (one datagram) and passes
 *                                 it to the child (SCM_RIGHTS): both hold it, the parent created
 *                                 it; prints "ready PARENT CHILD"
 *   passflows PORT N DELAY_MS HOLD_S  (bench, root) forks a receiver that drops to uid 1000
 *                                 and waits (a long-lived process the host's walk sees); after
 *                                 DELAY_MS the parent, 20 ms apart, N times opens a UDP socket
 *                                 bound to 127.0.0.1:PORT+i, passes it (SCM_RIGHTS) and closes
 *                                 it; the receiver connects each to 127.0.0.1:PORT, sends one
 *                                 datagram and holds it: f_cred and sk_uid name the sender,
 *                                 the receiver alone holds it. Prints "passflows: receiver
 *                                 PID waiting", then "passflows: ready: N passed"
 * Global option, first: --as-uid UID  the root-only probes (raw-tcp, frames) open their socket as
 *   root, then drop to UID (groups, gid and uid) before sending: the packets leave from a
 *   process of a blocked user holding a socket root created.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef IPPROTO_MPTCP
#define IPPROTO_MPTCP 262
#endif
#ifndef IPPROTO_UDPLITE
#define IPPROTO_UDPLITE 136
#endif
#define MAX_N 10000

static long as_uid = -1; /* --as-uid: drop to this uid once the privileged socket is open */

/* Drops root for --as-uid; exits if it cannot (a probe must not send as the wrong user). */
static void drop_privileges(void) {
    if (as_uid < 0) return;
    gid_t g = (gid_t)as_uid;
    if (setgroups(0, NULL) < 0 || setresgid(g, g, g) < 0 || setresuid(as_uid, as_uid, as_uid) < 0) {
        printf("xfprobe: cannot drop to uid %ld: %s\n", as_uid, strerror(errno));
        exit(1);
    }
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {}
}

static long arg_n(const char *s, long max) {
    long n = atol(s);
    if (n < 0) n = 0;
    return n > max ? max : n;
}

/* HOST:PORT as IPv4 or IPv6 sockaddr; returns the length, 0 on a bad address. */
static socklen_t parse_addr(const char *host, int port, struct sockaddr_storage *ss) {
    memset(ss, 0, sizeof *ss);
    struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons(port);
        return sizeof *a4;
    }
    if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons(port);
        return sizeof *a6;
    }
    fprintf(stderr, "bad address %s\n", host);
    return 0;
}

/* One connection attempt of `proto`: non-blocking connect, wait up to wait_ms, send a line,
 * close. Returns 1 if it connected. */
static int try_connect(const char *host, int port, int proto, long wait_ms) {
    struct sockaddr_storage ss;
    socklen_t len = parse_addr(host, port, &ss);
    if (!len) return 0;
    int s = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK, proto);
    if (s < 0) {
        fprintf(stderr, "socket(proto %d): %s\n", proto, strerror(errno));
        return 0;
    }
    int ok = 0;
    if (connect(s, (struct sockaddr *)&ss, len) == 0 || errno == EINPROGRESS) {
        struct pollfd p = {.fd = s, .events = POLLOUT};
        if (poll(&p, 1, wait_ms) == 1) {
            int err = 0;
            socklen_t el = sizeof err;
            getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &el);
            if (!err) {
                ok = 1;
                if (write(s, "xfprobe\n", 8) < 0) {}
            }
        }
    }
    close(s);
    return ok;
}

static int connects(const char *name, const char *host, int port, int proto, long n) {
    int ok = 0;
    for (long i = 0; i < n; i++) ok += try_connect(host, port, proto, 1000);
    printf("xfprobe %s: %ld attempts, %d connected\n", name, n, ok);
    return 0;
}

struct thread_args {
    const char *host;
    int port;
    long n;
    int ok;
    int unshared;
};

static void *thread_main(void *p) {
    struct thread_args *a = p;
    a->unshared = unshare(CLONE_FILES) == 0;
    for (long i = 0; i < a->n; i++) a->ok += try_connect(a->host, a->port, 0, 1000);
    return NULL;
}

static int thread_files(const char *host, int port, long n) {
    struct thread_args a = {host, port, n, 0, 0};
    pthread_t t;
    if (pthread_create(&t, NULL, thread_main, &a) != 0) return 1;
    pthread_join(t, NULL);
    printf("xfprobe thread-files: unshared=%d, %ld attempts, %d connected\n", a.unshared, n, a.ok);
    return 0;
}

static int udplite(const char *host, int port, long n) {
    struct sockaddr_storage ss;
    socklen_t len = parse_addr(host, port, &ss);
    if (!len) return 2;
    int s = socket(ss.ss_family, SOCK_DGRAM, IPPROTO_UDPLITE);
    if (s < 0) {
        printf("xfprobe udplite: socket: %s\n", strerror(errno));
        return 1;
    }
    int sent = 0;
    for (long i = 0; i < n; i++) {
        sent += sendto(s, "xfprobe udplite\n", 16, 0, (struct sockaddr *)&ss, len) > 0;
        sleep_ms(100);
    }
    printf("xfprobe udplite: %d of %ld sent\n", sent, n);
    return 0;
}

/* A ping socket (SOCK_DGRAM, IPPROTO_ICMP[V6]: needs ping_group_range) and the echo
 * request sequence i sent through it: what `ping` and `hold-ping` share. */
static int open_ping(const char *host, struct sockaddr_storage *ss, socklen_t *len, int *v6) {
    *len = parse_addr(host, 0, ss);
    if (!*len) return -2;
    *v6 = ss->ss_family == AF_INET6;
    return socket(ss->ss_family, SOCK_DGRAM, *v6 ? IPPROTO_ICMPV6 : IPPROTO_ICMP);
}

static int send_echo(int s, int v6, long i, const struct sockaddr_storage *ss, socklen_t len) {
    unsigned char pkt[16] = {v6 ? 128 : 8, 0, 0, 0, 0, 0, (unsigned char)(i >> 8), (unsigned char)i};
    memcpy(pkt + 8, "xfprobe!", 8);
    return sendto(s, pkt, sizeof pkt, 0, (const struct sockaddr *)ss, len) > 0;
}

static int ping(const char *host, long n) {
    struct sockaddr_storage ss;
    socklen_t len;
    int v6;
    int s = open_ping(host, &ss, &len, &v6);
    if (s == -2) return 2;
    if (s < 0) {
        printf("xfprobe ping: socket: %s (ping_group_range?)\n", strerror(errno));
        return 1;
    }
    int sent = 0;
    for (long i = 0; i < n; i++) {
        sent += send_echo(s, v6, i, &ss, len);
        sleep_ms(100);
    }
    printf("xfprobe ping: %d of %ld echoes sent\n", sent, n);
    return 0;
}

static int fdbomb(const char *host, int port, long procs, long dups, long seconds) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) return 1;
    pid_t kids[1000];
    long nkids = 0, total = 0;
    for (long p = 0; p < procs && p < 1000; p++) {
        int pipefd[2];
        if (pipe(pipefd) < 0) break;
        pid_t k = fork();
        if (k == 0) {
            long d = 0;
            for (; d < dups; d++)
                if (dup(s) < 0) break;
            if (write(pipefd[1], &d, sizeof d) < 0) {}
            sleep_ms(seconds * 1000 + 2000); /* hold them, bounded */
            _exit(0);
        }
        if (k < 0) break;
        long d = 0;
        if (read(pipefd[0], &d, sizeof d) < 0) d = 0;
        close(pipefd[0]);
        close(pipefd[1]);
        kids[nkids++] = k;
        total += d;
    }
    printf("xfprobe fdbomb: %ld processes hold %ld dups\n", nkids, total);
    fflush(stdout);
    double end = now() + seconds;
    int attempts = 0, ok = 0;
    while (now() < end && attempts < MAX_N) {
        attempts++;
        ok += try_connect(host, port, 0, 200);
        sleep_ms(200);
    }
    for (long i = 0; i < nkids; i++) kill(kids[i], SIGKILL);
    for (long i = 0; i < nkids; i++) waitpid(kids[i], NULL, 0);
    printf("xfprobe fdbomb: %d attempts, %d connected\n", attempts, ok);
    return 0;
}

static int send_close(const char *kind, const char *host, int port, long n) {
    struct sockaddr_storage ss;
    socklen_t len = parse_addr(host, port, &ss);
    if (!len) return 2;
    int v6 = ss.ss_family == AF_INET6;
    int proto = !strcmp(kind, "udplite") ? IPPROTO_UDPLITE
                : !strcmp(kind, "ping")  ? (v6 ? IPPROTO_ICMPV6 : IPPROTO_ICMP)
                                         : IPPROTO_UDP;
    int sent = 0, failed = 0;
    for (long i = 0; i < n; i++) {
        int s = socket(ss.ss_family, SOCK_DGRAM, proto);
        if (s < 0) {
            failed++;
            continue;
        }
        unsigned char pkt[16] = {v6 ? 128 : 8, 0, 0, 0, 0, 0, (unsigned char)(i >> 8), (unsigned char)i};
        memcpy(pkt + 8, "xfprobe!", 8);
        sent += sendto(s, pkt, sizeof pkt, 0, (struct sockaddr *)&ss, len) > 0;
        close(s);
    }
    printf("xfprobe send-close %s: %d of %ld sent (%d sockets refused)\n", kind, sent, n, failed);
    return 0;
}

static int bind6only(int port, long seconds) {
    int s = socket(AF_INET6, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(port)};
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 16) < 0) {
        printf("xfprobe bind6only: %s\n", strerror(errno));
        return 1;
    }
    printf("xfprobe bind6only: listening on [::]:%d v6only\n", port);
    fflush(stdout);
    sleep_ms(seconds * 1000);
    return 0;
}

static int spawn(const char *host, int port, long n, long gen) {
    for (long g = 0; g < gen; g++) {
        pid_t k = fork();
        if (k < 0) return 1;
        if (k > 0) {
            if (g == 0) {
                /* the original waits for the chain's report on its stdout, bounded */
                waitpid(k, NULL, 0);
                sleep_ms(n * 1000 + 3000);
                return 0;
            }
            _exit(0); /* intermediate parents exit: the last child is reparented */
        }
    }
    sleep_ms(300); /* let the intermediate parent go */
    int ok = 0;
    for (long i = 0; i < n; i++) {
        ok += try_connect(host, port, 0, 1000);
        sleep_ms(200);
    }
    printf("xfprobe spawn: pid %d ppid %d, %ld attempts, %d connected\n", getpid(), getppid(),
           n, ok);
    return 0;
}

static int rename_and_connect(const char *name, const char *host, int port, long n) {
    prctl(PR_SET_NAME, name, 0, 0, 0);
    return connects("rename", host, port, 0, n);
}

static uint16_t csum(const void *data, size_t len, uint32_t sum) {
    const uint8_t *p = data;
    for (size_t i = 0; i + 1 < len; i += 2) sum += (p[i] << 8) | p[i + 1];
    if (len & 1) sum += p[len - 1] << 8;
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

static int raw_tcp(int sport, const char *host, int dport, long n) {
    int s = socket(AF_INET, SOCK_RAW, IPPROTO_RAW);
    if (s < 0) {
        printf("xfprobe raw-tcp: socket: %s\n", strerror(errno));
        return 1;
    }
    struct sockaddr_in dst = {.sin_family = AF_INET};
    inet_pton(AF_INET, host, &dst.sin_addr);
    /* source: the address the kernel would use (connect a UDP socket to find it) */
    struct sockaddr_in src = {0};
    socklen_t sl = sizeof src;
    int u = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in d2 = dst;
    d2.sin_port = htons(dport);
    connect(u, (struct sockaddr *)&d2, sizeof d2);
    getsockname(u, (struct sockaddr *)&src, &sl);
    close(u);
    drop_privileges();
    int sent = 0;
    for (long i = 0; i < n; i++) {
        uint8_t pkt[40] = {0};
        struct iphdr *ip = (struct iphdr *)pkt;
        ip->version = 4;
        ip->ihl = 5;
        ip->tot_len = htons(40);
        ip->ttl = 64;
        ip->protocol = IPPROTO_TCP;
        ip->saddr = src.sin_addr.s_addr;
        ip->daddr = dst.sin_addr.s_addr;
        ip->id = htons(1000 + i);
        ip->check = htons(csum(pkt, 20, 0));
        uint8_t *t = pkt + 20;
        t[0] = sport >> 8, t[1] = sport & 0xff, t[2] = dport >> 8, t[3] = dport & 0xff;
        t[7] = (uint8_t)i + 1; /* seq */
        t[12] = 5 << 4;
        t[13] = 0x02; /* SYN */
        t[14] = 0xff, t[15] = 0xff;
        uint8_t pseudo[12 + 20];
        memcpy(pseudo, &ip->saddr, 4);
        memcpy(pseudo + 4, &ip->daddr, 4);
        pseudo[8] = 0, pseudo[9] = IPPROTO_TCP, pseudo[10] = 0, pseudo[11] = 20;
        memcpy(pseudo + 12, t, 20);
        uint16_t c = csum(pseudo, sizeof pseudo, 0);
        t[16] = c >> 8, t[17] = c & 0xff;
        sent += sendto(s, pkt, sizeof pkt, 0, (struct sockaddr *)&dst, sizeof dst) > 0;
        sleep_ms(100);
    }
    printf("xfprobe raw-tcp: %d of %ld forged SYNs from port %d sent\n", sent, n, sport);
    return 0;
}

/* An IPv4/UDP packet to 198.18.0.1:2353 from 198.18.1.1 (addresses as in the lab; the port
 * is the red team's, not the workload spray's 5353). */
static size_t inner_ipv4_udp(uint8_t *p) {
    uint8_t pkt[20 + 8 + 8] = {0x45, 0, 0, 36, 0, 1, 0, 0, 64, 17, 0, 0, 198, 18, 1, 1, 198, 18, 0, 1};
    uint16_t c = csum(pkt, 20, 0);
    pkt[10] = c >> 8, pkt[11] = c & 0xff;
    uint8_t *u = pkt + 20;
    u[0] = 0x30, u[1] = 0x39, u[2] = 2353 >> 8, u[3] = 2353 & 0xff, u[5] = 16;
    memcpy(u + 8, "xfprobe!", 8);
    memcpy(p, pkt, sizeof pkt);
    return sizeof pkt;
}

static int frames(const char *iface, const char *kind, long n) {
    int s = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    if (s < 0) {
        printf("xfprobe frames: socket: %s\n", strerror(errno));
        return 1;
    }
    struct ifreq ifr = {0};
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", iface);
    if (ioctl(s, SIOCGIFINDEX, &ifr) < 0) return 1;
    int ifindex = ifr.ifr_ifindex;
    if (ioctl(s, SIOCGIFHWADDR, &ifr) < 0) return 1;
    uint8_t f[128] = {0};
    memset(f, 0xff, 6);
    memcpy(f + 6, ifr.ifr_hwaddr.sa_data, 6);
    size_t len = 12;
    if (!strcmp(kind, "vlan")) {
        f[len++] = 0x81, f[len++] = 0x00, f[len++] = 0x00, f[len++] = 0x07; /* VLAN 7 */
        f[len++] = 0x08, f[len++] = 0x00;
        len += inner_ipv4_udp(f + len);
    } else if (!strcmp(kind, "qinq")) {
        f[len++] = 0x88, f[len++] = 0xa8, f[len++] = 0x00, f[len++] = 0x07;
        f[len++] = 0x81, f[len++] = 0x00, f[len++] = 0x00, f[len++] = 0x08;
        f[len++] = 0x08, f[len++] = 0x00;
        len += inner_ipv4_udp(f + len);
    } else if (!strcmp(kind, "pppoe")) {
        f[len++] = 0x88, f[len++] = 0x64;
        f[len++] = 0x11, f[len++] = 0x00, f[len++] = 0x00, f[len++] = 0x01; /* ver/type, code, sid */
        f[len++] = 0x00, f[len++] = 38;                                     /* length */
        f[len++] = 0x00, f[len++] = 0x21;                                   /* PPP: IPv4 */
        len += inner_ipv4_udp(f + len);
    } else {
        f[len++] = 0x88, f[len++] = 0xb5;
        memcpy(f + len, "xfprobe other ethertype", 23);
        len += 23;
    }
    if (len < 60) len = 60;
    struct sockaddr_ll to = {.sll_family = AF_PACKET, .sll_ifindex = ifindex, .sll_halen = 6};
    memset(to.sll_addr, 0xff, 6);
    drop_privileges();
    int sent = 0;
    for (long i = 0; i < n; i++) {
        sent += sendto(s, f, len, 0, (struct sockaddr *)&to, sizeof to) > 0;
        sleep_ms(100);
    }
    printf("xfprobe frames: %d of %ld %s frames sent\n", sent, n, kind);
    return 0;
}

static int flood(const char *host, long seconds, long max) {
    struct sockaddr_storage ss;
    if (!parse_addr(host, 1, &ss)) return 2;
    double end = now() + seconds;
    long opened = 0;
    int open_fds[256];
    int nopen = 0;
    srand(getpid());
    while (now() < end && opened < max) {
        struct sockaddr_storage a;
        socklen_t len = parse_addr(host, 1024 + rand() % 60000, &a);
        int s = socket(a.ss_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
        if (s < 0) {
            sleep_ms(10);
            continue;
        }
        connect(s, (struct sockaddr *)&a, len);
        opened++;
        if (nopen == 256) {
            for (int i = 0; i < nopen; i++) close(open_fds[i]);
            nopen = 0;
        }
        open_fds[nopen++] = s;
    }
    for (int i = 0; i < nopen; i++) close(open_fds[i]);
    printf("xfprobe flood: %ld connections opened\n", opened);
    return 0;
}

static int hold(const char *host, int port, long seconds) {
    struct sockaddr_storage ss;
    socklen_t len = parse_addr(host, port, &ss);
    if (!len) return 2;
    int s = socket(ss.ss_family, SOCK_STREAM, 0);
    if (connect(s, (struct sockaddr *)&ss, len) < 0) {
        printf("xfprobe hold: connect: %s\n", strerror(errno));
        return 1;
    }
    printf("xfprobe hold: connected\n");
    fflush(stdout);
    double end = now() + seconds;
    while (now() < end) {
        if (write(s, "x", 1) < 0) break;
        sleep_ms(500);
    }
    close(s);
    return 0;
}

static int bound4(int type, const char *ip, int port) {
    int s = socket(AF_INET, type, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, ip, &a.sin_addr);
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) < 0) {
        if (s >= 0) close(s);
        return -1;
    }
    return s;
}

static int newflows(int port, long n, long delay_ms, long hold_s) {
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &to.sin_addr);
    int lis = bound4(SOCK_STREAM, "0.0.0.0", port);
    if (lis < 0 || listen(lis, 1024) < 0) {
        printf("xfprobe newflows: listen :%d: %s\n", port, strerror(errno));
        return 1;
    }
    printf("xfprobe newflows: pid %d waiting\n", getpid());
    sleep_ms(delay_ms);
    long listeners = 0, conns = 0, udps = 0;
    for (long i = 0; i < n; i++) {
        int l = bound4(SOCK_STREAM, "0.0.0.0", port + 1000 + (int)i);
        listeners += l >= 0 && listen(l, 8) == 0;
        int c = bound4(SOCK_STREAM, "127.0.0.1", port + 1 + (int)i);
        if (c >= 0 && connect(c, (struct sockaddr *)&to, sizeof to) == 0)
            conns += accept(lis, NULL, NULL) >= 0;
        int u = bound4(SOCK_DGRAM, "127.0.0.1", port + 2000 + (int)i);
        if (u >= 0 && connect(u, (struct sockaddr *)&to, sizeof to) == 0)
            udps += send(u, "x", 1, 0) == 1;
        sleep_ms(20);
    }
    printf("xfprobe newflows: ready: %ld listeners, %ld connections, %ld udp\n", listeners,
           conns, udps);
    sleep_ms(hold_s * 1000); /* the sockets close at exit */
    return 0;
}

static void ready(int s) {
    printf("ready %d\n", s);
    fflush(stdout);
}

/* hold-udplite, hold-mptcp: a connected socket held `secs` seconds (UDP-Lite: one datagram a
 * second). */
static int hold_connected(int lite, const char *host, int port, long secs) {
    struct sockaddr_storage ss;
    socklen_t len = parse_addr(host, port, &ss);
    if (!len) return 2;
    int s = lite ? socket(ss.ss_family, SOCK_DGRAM, IPPROTO_UDPLITE)
                 : socket(ss.ss_family, SOCK_STREAM, IPPROTO_MPTCP);
    if (s < 0 || connect(s, (struct sockaddr *)&ss, len) != 0) {
        perror(lite ? "hold-udplite" : "hold-mptcp");
        return 1;
    }
    ready(s);
    for (long i = 0; i < secs; i++) {
        if (lite && send(s, "x", 1, 0) < 0) {}
        sleep_ms(1000);
    }
    return 0;
}

struct hold_args {
    const char *host;
    int port;
    long secs;
};

static void *hold_thread_main(void *p) {
    struct hold_args *a = p;
    if (unshare(CLONE_FILES) != 0) {
        perror("unshare");
        exit(1);
    }
    struct sockaddr_storage ss;
    socklen_t len = parse_addr(a->host, a->port, &ss);
    int s = len ? socket(ss.ss_family, SOCK_STREAM, 0) : -1;
    if (s < 0 || connect(s, (struct sockaddr *)&ss, len) != 0) {
        perror("hold-thread");
        exit(1);
    }
    ready(s);
    sleep_ms(a->secs * 1000);
    return NULL;
}

static int hold_thread(const char *host, int port, long secs) {
    struct hold_args a = {host, port, secs};
    pthread_t t;
    if (pthread_create(&t, NULL, hold_thread_main, &a) != 0) return 1;
    pthread_join(t, NULL);
    return 0;
}

static int hold_ping(const char *host, long secs) {
    struct sockaddr_storage ss;
    socklen_t len;
    int v6;
    int s = open_ping(host, &ss, &len, &v6);
    if (s == -2) return 2;
    if (s < 0) {
        perror("hold-ping");
        return 1;
    }
    ready(s);
    for (long i = 0; i < secs; i++) {
        send_echo(s, v6, i, &ss, len);
        sleep_ms(1000);
    }
    return 0;
}

static int hold_packet(long secs) {
    int s = socket(AF_PACKET, SOCK_RAW, htons(0x0003)); /* ETH_P_ALL */
    if (s < 0) {
        perror("hold-packet");
        return 1;
    }
    ready(s);
    sleep_ms(secs * 1000);
    return 0;
}

static int hold_bomb(long procs, long dups, long secs) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0) return 1;
    for (long p = 0; p < procs; p++) {
        pid_t k = fork();
        if (k == 0) {
            for (long i = 0; i < dups; i++)
                if (dup(s) < 0) break;
            sleep_ms(secs * 1000);
            _exit(0);
        }
        if (k < 0) break;
    }
    ready(s);
    while (wait(NULL) > 0) {}
    return 0;
}

/* One fd over a unix socket (SCM_RIGHTS) with a one-byte message: 0 sent, -1 not. */
static int send_fd(int sock, int fd) {
    char byte = 'x';
    char ctl[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    struct msghdr msg = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl, .msg_controllen = sizeof ctl};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    return sendmsg(sock, &msg, 0) == 1 ? 0 : -1;
}

/* The fd send_fd() passed: the received fd, -1 if no message or no fd came. */
static int recv_fd(int sock) {
    char byte;
    char ctl[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    struct msghdr msg = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl, .msg_controllen = sizeof ctl};
    if (recvmsg(sock, &msg, 0) != 1) return -1;
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    int fd = -1;
    if (c && c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
        memcpy(&fd, CMSG_DATA(c), sizeof fd);
    return fd;
}

/* hold-passfd: a socket one task creates and passes (SCM_RIGHTS) to a task that became uid 1001
 * after the host's walk: the reference-count shortcut (xfgate.vmi.holders) must find both. */
static int hold_passfd(int port, long delay_ms, long secs) {
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_DGRAM, 0, pair) != 0) {
        perror("socketpair");
        return 1;
    }
    pid_t child = fork();
    if (child == 0) {
        sleep_ms(delay_ms);
        if (setgid(1001) != 0 || setuid(1001) != 0) {
            perror("setuid");
            _exit(1);
        }
        if (recv_fd(pair[1]) < 0) {
            perror("recvmsg");
            _exit(1);
        }
        sleep_ms(secs * 1000);
        _exit(0);
    }
    if (child < 0) return 1;
    sleep_ms(delay_ms + 300);
    struct sockaddr_storage me, to;
    socklen_t len = parse_addr("127.0.0.1", port, &me);
    parse_addr("127.0.0.1", port + 1, &to);
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0 || bind(s, (struct sockaddr *)&me, len) != 0 ||
        connect(s, (struct sockaddr *)&to, len) != 0) {
        perror("hold-passfd");
        return 1;
    }
    if (send(s, "x", 1, 0) != 1) perror("send");
    if (send_fd(pair[0], s) != 0) {
        perror("sendmsg");
        return 1;
    }
    sleep_ms(200); /* received by the child */
    printf("ready %d %d\n", getpid(), child);
    fflush(stdout);
    sleep_ms(secs * 1000);
    waitpid(child, NULL, 0);
    return 0;
}

/* passflows: sockets received by SCM_RIGHTS after the host's walk (systemd socket activation,
 * privilege-separated daemons), the receiver their only holder. */
static int passflows(int port, long n, long delay_ms, long hold_s) {
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_DGRAM, 0, pair) != 0) {
        perror("socketpair");
        return 1;
    }
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &to.sin_addr);
    pid_t child = fork();
    if (child == 0) {
        close(pair[0]);
        if (setgid(1000) != 0 || setuid(1000) != 0) {
            perror("setuid");
            _exit(1);
        }
        long got = 0;
        for (long i = 0; i < n; i++) {
            int s = recv_fd(pair[1]);
            if (s >= 0 && connect(s, (struct sockaddr *)&to, sizeof to) == 0)
                got += send(s, "x", 1, 0) == 1;
        }
        printf("xfprobe passflows: ready: %ld passed\n", got);
        sleep_ms(hold_s * 1000); /* the sockets close at exit */
        _exit(0);
    }
    if (child < 0) return 1;
    close(pair[1]);
    printf("xfprobe passflows: receiver %d waiting\n", child);
    sleep_ms(delay_ms);
    for (long i = 0; i < n; i++) {
        int s = bound4(SOCK_DGRAM, "127.0.0.1", port + 1 + (int)i);
        if (s < 0) continue;
        if (send_fd(pair[0], s) != 0) perror("sendmsg");
        close(s);
        sleep_ms(20);
    }
    close(pair[0]);
    waitpid(child, NULL, 0);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc > 3 && !strcmp(argv[1], "--as-uid")) {
        as_uid = atol(argv[2]);
        argv += 2;
        argc -= 2;
    }
    if (argc < 2) goto usage;
    const char *c = argv[1];
    if (!strcmp(c, "mptcp") && argc == 5)
        return connects("mptcp", argv[2], atoi(argv[3]), IPPROTO_MPTCP, arg_n(argv[4], MAX_N));
    if (!strcmp(c, "tcp") && argc == 5)
        return connects("tcp", argv[2], atoi(argv[3]), 0, arg_n(argv[4], MAX_N));
    if (!strcmp(c, "thread-files") && argc == 5)
        return thread_files(argv[2], atoi(argv[3]), arg_n(argv[4], MAX_N));
    if (!strcmp(c, "udplite") && argc == 5)
        return udplite(argv[2], atoi(argv[3]), arg_n(argv[4], MAX_N));
    if (!strcmp(c, "ping") && argc == 4) return ping(argv[2], arg_n(argv[3], MAX_N));
    if (!strcmp(c, "fdbomb") && argc == 7)
        return fdbomb(argv[2], atoi(argv[3]), arg_n(argv[4], 1000), arg_n(argv[5], 100000),
                      arg_n(argv[6], 600));
    if (!strcmp(c, "bind6only") && argc == 4) return bind6only(atoi(argv[2]), arg_n(argv[3], 600));
    if (!strcmp(c, "spawn") && argc == 6)
        return spawn(argv[2], atoi(argv[3]), arg_n(argv[4], 100), arg_n(argv[5], 10));
    if (!strcmp(c, "rename") && argc == 6)
        return rename_and_connect(argv[2], argv[3], atoi(argv[4]), arg_n(argv[5], MAX_N));
    if (!strcmp(c, "raw-tcp") && argc == 6)
        return raw_tcp(atoi(argv[2]), argv[3], atoi(argv[4]), arg_n(argv[5], MAX_N));
    if (!strcmp(c, "frames") && argc == 5) return frames(argv[2], argv[3], arg_n(argv[4], MAX_N));
    if (!strcmp(c, "flood") && argc == 5)
        return flood(argv[2], arg_n(argv[3], 600), arg_n(argv[4], 1000000));
    if (!strcmp(c, "send-close") && argc == 6)
        return send_close(argv[2], argv[3], atoi(argv[4]), arg_n(argv[5], MAX_N));
    if (!strcmp(c, "hold-udplite") && argc == 5)
        return hold_connected(1, argv[2], atoi(argv[3]), arg_n(argv[4], 600));
    if (!strcmp(c, "hold-mptcp") && argc == 5)
        return hold_connected(0, argv[2], atoi(argv[3]), arg_n(argv[4], 600));
    if (!strcmp(c, "hold-thread") && argc == 5)
        return hold_thread(argv[2], atoi(argv[3]), arg_n(argv[4], 600));
    if (!strcmp(c, "hold-ping") && argc == 4) return hold_ping(argv[2], arg_n(argv[3], 600));
    if (!strcmp(c, "hold-packet") && argc == 3) return hold_packet(arg_n(argv[2], 600));
    if (!strcmp(c, "hold-bomb") && argc == 5)
        return hold_bomb(arg_n(argv[2], 1000), arg_n(argv[3], 100000), arg_n(argv[4], 600));
    if (!strcmp(c, "hold-passfd") && argc == 5)
        return hold_passfd(atoi(argv[2]), arg_n(argv[3], 60000), arg_n(argv[4], 600));
    if (!strcmp(c, "hold") && argc == 5) return hold(argv[2], atoi(argv[3]), arg_n(argv[4], 600));
    if (!strcmp(c, "passflows") && argc == 6)
        return passflows(atoi(argv[2]), arg_n(argv[3], 300), arg_n(argv[4], 60000),
                         arg_n(argv[5], 600));
    if (!strcmp(c, "newflows") && argc == 6)
        return newflows(atoi(argv[2]), arg_n(argv[3], 300), arg_n(argv[4], 60000),
                        arg_n(argv[5], 600));
usage:
    fprintf(stderr, "usage: see the comment at the top of xfprobe.c\n");
    return 2;
}
