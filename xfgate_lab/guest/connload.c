#define _GNU_SOURCE
/* connload: the guest's outgoing load generator (httperf is not in the guest). Opens NUM TCP
 * connections to HOST:PORT at a fixed offered RATE per second, one HTTP/1.0 request and its
 * reply each (the server closes), and prints the result in httperf's own line format so the
 * host parses both directions with one parser. Bounded: NUM <= 200000, RATE <= 5000, at most
 * MAX_OPEN connections open at once (a connection that would exceed it counts as fd-unavail),
 * each connection gives up after TIMEOUT_MS, and the whole run after NUM/RATE + TIMEOUT + 5 s.
 * Usage: connload HOST PORT RATE NUM [TIMEOUT_MS] */
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_NUM 200000
#define MAX_RATE 5000.0
#define MAX_OPEN 1000
#define MAX_FD 4096

struct conn {
    int open, established;
    double start, connected;
    int status_seen;
};

static struct conn conns[MAX_FD];
static double times[MAX_NUM];
static const char request[] = "GET / HTTP/1.0\r\nHost: client\r\n\r\n";

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: connload HOST PORT RATE NUM [TIMEOUT_MS]\n");
        return 2;
    }
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &sa.sin_addr) != 1) return 2;
    double rate = atof(argv[3]);
    long num = atol(argv[4]);
    long timeout_ms = argc > 5 ? atol(argv[5]) : 5000;
    if (rate <= 0 || rate > MAX_RATE || num <= 0 || num > MAX_NUM) return 2;
    if (timeout_ms < 100) timeout_ms = 100;
    if (timeout_ms > 10000) timeout_ms = 10000;
    double tmo = timeout_ms / 1000.0;
    int ep = epoll_create1(0);
    if (ep < 0) return 1;
    long started = 0, done = 0, ok = 0, status2xx = 0, open_now = 0;
    long refused = 0, reset = 0, timo = 0, fdun = 0, addrun = 0, other = 0;
    double sum_connect = 0;
    long n_connect = 0;
    double t0 = now(), deadline = t0 + num / rate + tmo + 5.0;
    double sweep_at = t0;
    struct epoll_event evs[256];
    while (done < num) {
        double t = now();
        if (t > deadline) break;
        /* Open every connection that is due (the offered rate does not wait for replies). */
        while (started < num && t0 + started / rate <= t) {
            started++;
            if (open_now >= MAX_OPEN) { fdun++; done++; continue; }
            int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
            if (s < 0 || s >= MAX_FD) {
                if (s >= 0) close(s);
                fdun++; done++; continue;
            }
            conns[s] = (struct conn){.open = 1, .start = now()};
            if (connect(s, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) {
                if (errno == EADDRNOTAVAIL) addrun++; else if (errno == ECONNREFUSED) refused++;
                else other++;
                conns[s].open = 0; close(s); done++; continue;
            }
            struct epoll_event ev = {.events = EPOLLOUT, .data.fd = s};
            epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev);
            open_now++;
        }
        int wait_ms = 10;
        if (started < num) {
            double next = t0 + started / rate - now();
            wait_ms = next <= 0 ? 0 : (int)ceil(next * 1000.0);
            if (wait_ms > 10) wait_ms = 10;
        }
        int n = epoll_wait(ep, evs, 256, wait_ms);
        for (int i = 0; i < n; i++) {
            int s = evs[i].data.fd;
            struct conn *c = &conns[s];
            if (!c->open) continue;
            int finished = 0;
            if (!c->established) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) {
                    if (err == ECONNREFUSED) refused++; else if (err == ECONNRESET) reset++;
                    else other++;
                    finished = 1;
                } else {
                    c->established = 1;
                    c->connected = now();
                    sum_connect += c->connected - c->start;
                    n_connect++;
                    if (send(s, request, sizeof request - 1, MSG_NOSIGNAL) < 0) {
                        other++;
                        finished = 1;
                    } else {
                        struct epoll_event ev = {.events = EPOLLIN, .data.fd = s};
                        epoll_ctl(ep, EPOLL_CTL_MOD, s, &ev);
                    }
                }
            } else {
                char buf[2048];
                ssize_t r = recv(s, buf, sizeof buf, 0);
                if (r > 0) {
                    if (!c->status_seen && r >= 12) {
                        c->status_seen = 1;
                        if (buf[9] == '2') status2xx++;
                    }
                } else if (r == 0) { /* the reply, read to the server's close */
                    if (ok < MAX_NUM) times[ok++] = now() - c->start;
                    finished = 1;
                } else if (errno != EAGAIN && errno != EINTR) {
                    if (errno == ECONNRESET) reset++; else other++;
                    finished = 1;
                }
            }
            if (finished) { c->open = 0; close(s); open_now--; done++; }
        }
        /* Per-connection timeout, checked at most every 50 ms (bounded scan of MAX_FD). */
        t = now();
        if (t - sweep_at > 0.05) {
            sweep_at = t;
            for (int s = 0; s < MAX_FD; s++) {
                if (conns[s].open && t - conns[s].start > tmo) {
                    conns[s].open = 0; close(s); open_now--; done++; timo++;
                }
            }
        }
    }
    /* Whatever is still open at the deadline timed out. */
    for (int s = 0; s < MAX_FD; s++)
        if (conns[s].open) { conns[s].open = 0; close(s); timo++; }
    timo += num - started; /* never started: the run's own deadline passed */
    double dur = now() - t0;
    qsort(times, ok, sizeof times[0], cmp);
    double mn = 0, mx = 0, avg = 0, med = 0, sd = 0;
    if (ok) {
        mn = times[0]; mx = times[ok - 1]; med = times[ok / 2];
        for (long i = 0; i < ok; i++) avg += times[i];
        avg /= ok;
        for (long i = 0; i < ok; i++) sd += (times[i] - avg) * (times[i] - avg);
        sd = ok > 1 ? sqrt(sd / (ok - 1)) : 0;
    }
    long errs = refused + reset + timo + fdun + addrun + other;
    printf("connload %s:%s rate %g num %ld timeout %ld ms\n", argv[1], argv[2], rate, num,
           timeout_ms);
    printf("Total: connections %ld requests %ld replies %ld test-duration %.3f s\n", started,
           n_connect, ok, dur);
    printf("Connection rate: %.1f conn/s\n", dur > 0 ? started / dur : 0.0);
    printf("Connection time [ms]: min %.2f avg %.2f max %.2f median %.2f stddev %.2f\n",
           mn * 1e3, avg * 1e3, mx * 1e3, med * 1e3, sd * 1e3);
    printf("Connection time [ms]: connect %.2f\n", n_connect ? sum_connect / n_connect * 1e3 : 0.0);
    printf("Reply status: 1xx=0 2xx=%ld 3xx=0 4xx=0 5xx=0\n", status2xx);
    printf("Errors: total %ld client-timo %ld socket-timo 0 connrefused %ld connreset %ld\n", errs,
           timo, refused, reset);
    printf("Errors: fd-unavail %ld addrunavail %ld ftab-full 0 other %ld\n", fdun, addrun, other);
    return 0;
}
