/* The pod sandbox's pause process, as a kubelet's container runtime starts
 * it: it holds the pod's namespaces and does nothing else.
 *
 *     netemu-pause NETNS-PATH HOSTNAME
 *
 * It joins the network namespace at NETNS-PATH (/run/netns/<cluster>-pod-...),
 * makes a UTS namespace of its own with the pod's hostname, and then sleeps
 * until a signal: SIGINT or SIGTERM ends it (status 0, as Kubernetes' pause),
 * SIGCHLD reaps whatever child it was left. Its command line then reads
 * "/pause" and its name (comm) "pause": the kubelet waits for that name, set
 * only once the namespaces are in place, before it starts the containers
 * (which join that UTS namespace by its /proc/PID/ns/uts).
 *
 * One exec instead of the five of `nsenter ... unshare --uts bash -c
 * 'hostname "$0" && exec -a pause sleep infinity'` (4.2 ms of CPU a pod,
 * measured, against 0.5 ms): at 1,000 pods, seconds of a cluster's bring-up.
 * sandbox.pause_argv falls back to that chain where this was not built. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig)
{
    (void)sig;
    _exit(0);
}

static void reap(int sig)
{
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0)
        ;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fputs("usage: netemu-pause NETNS-PATH HOSTNAME\n", stderr);
        return 2;
    }
    int fd = open(argv[1], O_RDONLY | O_CLOEXEC);
    if (fd < 0 || setns(fd, CLONE_NEWNET) != 0) {
        perror(argv[1]);
        return 1;
    }
    close(fd);
    if (unshare(CLONE_NEWUTS) != 0) {
        perror("netemu-pause: unshare(CLONE_NEWUTS)");
        return 1;
    }
    if (sethostname(argv[2], strlen(argv[2])) != 0) {
        perror("netemu-pause: sethostname");
        return 1;
    }
    struct sigaction down = {.sa_handler = stop}, child = {.sa_handler = reap, .sa_flags = SA_RESTART};
    sigaction(SIGINT, &down, NULL);
    sigaction(SIGTERM, &down, NULL);
    sigaction(SIGCHLD, &child, NULL);
    /* The command line as Kubernetes' (ps shows "/pause"): the arguments'
     * bytes are the kernel's record of it. */
    char *end = argv[argc - 1] + strlen(argv[argc - 1]);
    memset(argv[0], 0, (size_t)(end - argv[0]));
    strcpy(argv[0], "/pause");
    prctl(PR_SET_NAME, "pause", 0, 0, 0);        /* ready: the kubelet waits for this name */
    for (;;)
        pause();
}
